"""Splits: patient-level disjointness, stratification, folds, reproducibility, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainmri.data.preprocess import MANIFEST_COLUMNS
from brainmri.data.splits import make_splits, split_summary
from brainmri.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")


def fake_manifest(patients: int = 30, btm_per_class: int = 20, seed: int = 0) -> pd.DataFrame:
    """LGG patients with 20-60 slices (a contiguous tumor stretch) and btm rows with duplicates."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        inst = INSTITUTIONS[p % len(INSTITUTIONS)]
        patient = f"TCGA_{inst}_{1000 + p}_20000101"
        n = int(rng.integers(20, 61))
        start, length = int(rng.integers(3, n // 2)), int(rng.integers(n // 5, n // 2))
        for s in range(1, n + 1):
            tumor = int(start <= s < start + length)
            rows.append(
                {"id": f"{patient}_{s}", "source": "lgg", "patient": patient,
                 "institution": inst, "slice_index": s, "has_tumor": tumor,
                 "label": "tumor" if tumor else "no_tumor", "btm_class": ""}
            )  # fmt: skip
    for label, cls in (("tumor", "glioma"), ("no_tumor", "notumor")):
        for i in range(btm_per_class):
            rows.append(
                {"id": f"btm_{cls}_{i}", "source": "btm", "patient": f"{cls}_{i}",
                 "institution": "", "slice_index": -1, "has_tumor": int(label == "tumor"),
                 "label": label, "btm_class": cls}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["duplicate_group"] = frame["id"]
    # Every 5th btm image duplicates the one before it.
    btm = frame.index[frame["source"] == "btm"]
    for position in btm[5::5]:
        frame.loc[position, "duplicate_group"] = frame.loc[position - 1, "duplicate_group"]
    for column in MANIFEST_COLUMNS:
        if column not in frame:
            frame[column] = ""
    return frame[MANIFEST_COLUMNS]


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return fake_manifest()


@pytest.fixture(scope="module")
def splits(manifest) -> pd.DataFrame:
    return make_splits(manifest, test_fraction=0.2, val_fraction=0.1, folds=5, seed=42)


def test_patients_never_cross_splits_or_folds(manifest, splits):
    table = manifest.merge(splits, on="id")
    assert list(splits["id"]) == list(manifest["id"])
    lgg = table[table["source"] == "lgg"]
    assert (lgg.groupby("patient")["cls_split"].nunique() == 1).all()
    assert (lgg.groupby("patient")["seg_split"].nunique() == 1).all()
    assert (lgg.groupby("patient")["fold"].nunique() == 1).all()
    assert set(lgg["cls_split"]) == {"train", "val", "test"}
    assert set(lgg["seg_split"]) == {"train", "test"}
    # The classification test set is the segmentation test set.
    assert ((lgg["cls_split"] == "test") == (lgg["seg_split"] == "test")).all()
    # Folds cover every segmentation training patient (val patients included), test gets -1.
    train = lgg[lgg["seg_split"] == "train"]
    assert set(train["fold"]) == set(range(5))
    assert (lgg.loc[lgg["seg_split"] == "test", "fold"] == -1).all()
    assert set(train.loc[train["cls_split"] == "val", "fold"]) <= set(range(5))
    btm = table[table["source"] == "btm"]
    assert set(btm["seg_split"]) == {"unused"} and set(btm["fold"]) == {-1}


def test_test_set_resembles_the_whole(manifest, splits):
    table = manifest.merge(splits, on="id")
    lgg = table[table["source"] == "lgg"]
    patients = lgg.groupby("patient").agg(slices=("id", "size"), split=("cls_split", "first"))
    test = lgg[lgg["cls_split"] == "test"]
    assert test["patient"].nunique() == round(0.2 * 30)
    # Slice fraction within one (average) patient's worth of slices of the requested 20 %.
    assert abs(len(test) / len(lgg) - 0.2) <= patients["slices"].mean() / len(lgg)
    assert abs(test["has_tumor"].mean() - lgg["has_tumor"].mean()) < 0.03
    # Institution mix: 6 test patients over 5 institutions of 6 patients each.
    counts = test.groupby("institution")["patient"].nunique()
    assert counts.sum() == 6 and counts.min() >= 1 and counts.max() <= 2
    val = lgg[lgg["cls_split"] == "val"]
    assert val["patient"].nunique() == round(0.1 * 24)


def test_second_dataset_validation_is_class_stratified_with_duplicates_together(manifest, splits):
    table = manifest.merge(splits, on="id")
    btm = table[table["source"] == "btm"]
    assert set(btm["cls_split"]) == {"train", "val"}
    assert (btm.groupby("duplicate_group")["cls_split"].nunique() == 1).all()
    per_class = btm[btm["cls_split"] == "val"].groupby("btm_class")["duplicate_group"].nunique()
    groups = btm.groupby("btm_class")["duplicate_group"].nunique()
    assert (per_class == (groups * 0.1).round().astype(int)).all()


def test_without_the_second_dataset_btm_rows_are_unused(manifest):
    splits = make_splits(manifest, folds=5, seed=42, use_second_dataset=False)
    btm = splits[manifest["source"].to_numpy() == "btm"]
    assert set(btm["cls_split"]) == {"unused"}


def test_seed_changes_and_fixes_the_split(manifest, splits):
    again = make_splits(manifest, test_fraction=0.2, val_fraction=0.1, folds=5, seed=42)
    other = make_splits(manifest, test_fraction=0.2, val_fraction=0.1, folds=5, seed=43)
    assert again.equals(splits)
    assert not other["cls_split"].equals(splits["cls_split"])


def test_slice_level_split_is_stratified_and_mixes_patients(manifest):
    splits = make_splits(manifest, level="slice", folds=4, seed=1)
    table = manifest.merge(splits, on="id")
    lgg = table[table["source"] == "lgg"]
    test = lgg[lgg["cls_split"] == "test"]
    assert abs(len(test) / len(lgg) - 0.2) < 0.01
    assert abs(test["has_tumor"].mean() - lgg["has_tumor"].mean()) < 0.01
    assert (lgg.groupby("patient")["cls_split"].nunique() > 1).any()
    assert set(lgg.loc[lgg["seg_split"] == "train", "fold"]) == set(range(4))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"folds": 30}, "split.folds"),
        ({"test_fraction": 0.01}, "split.test_fraction"),
        ({"test_fraction": 0.99}, "split.test_fraction"),
        ({"val_fraction": 0.01}, "split.val_fraction"),
        ({"level": "voxel"}, "split.level"),
    ],
)
def test_impossible_settings_name_the_config_key(manifest, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        make_splits(manifest, **{"folds": 5, **kwargs})


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"split\.(test_fraction|val_fraction|folds)"):
        make_splits(fake_manifest(patients=3, btm_per_class=4), folds=2)


def test_summary_counts_splits_folds_classes_and_patients(manifest, splits):
    summary = split_summary(manifest, splits)
    assert list(summary.columns) == [
        "stage", "split", "source", "tumor", "no_tumor", "total", "patients"
    ]  # fmt: skip
    cls = summary[summary["stage"] == "classification"]
    assert cls["total"].sum() == len(manifest)
    seg = summary[summary["stage"] == "segmentation"]
    assert sorted(seg["split"]) == ["fold0", "fold1", "fold2", "fold3", "fold4", "test"]
    assert seg["total"].sum() == (manifest["source"] == "lgg").sum()
    assert seg["patients"].astype(int).sum() == 30
    assert (summary["tumor"] + summary["no_tumor"] == summary["total"]).all()


def test_script_output_is_byte_identical_for_the_same_seed(tmp_path, manifest):
    path = tmp_path / "manifest.csv"
    manifest.to_csv(path, index=False)

    def run(name: str, seed: int, second: str = "True") -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            str(REPO / "workflow_scripts" / "make_splits.py"),
            f"--manifest={path}",
            "--level=patient",
            "--test-fraction=0.2",
            "--val-fraction=0.1",
            "--folds=5",
            f"--seed={seed}",
            f"--second-dataset={second}",
            f"--splits={tmp_path / name / 'splits.csv'}",
            f"--summary={tmp_path / name / 'summary.tsv'}",
        ]
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    assert run("a", 7).returncode == 0
    assert run("b", 7).returncode == 0
    assert run("c", 8, "False").returncode == 0
    a, b, c = ((tmp_path / n / "splits.csv").read_bytes() for n in "abc")
    assert a == b and a != c
    assert (tmp_path / "a" / "summary.tsv").read_bytes() == (
        tmp_path / "b" / "summary.tsv"
    ).read_bytes()
    unused = pd.read_csv(tmp_path / "c" / "splits.csv")
    assert (unused.loc[unused["id"].str.startswith("btm_"), "cls_split"] == "unused").all()
    result = run("d", 7, "maybe")
    assert result.returncode == 2 and "expected True or False" in result.stderr
    assert not (tmp_path / "d").exists()


def test_a_one_patient_validation_set_warns_and_names_the_key(caplog):
    """10 patients: 8 train after the test split, 10 % of them is one validation patient."""
    small = fake_manifest(patients=10, btm_per_class=4)
    with caplog.at_level("WARNING", logger="brainmri.splits"):
        make_splits(small, val_fraction=0.1, folds=2)
    assert "split.val_fraction" in caplog.text and "only 1 patient(s)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainmri.splits"):
        result = make_splits(small, val_fraction=0.25, folds=2)
    assert caplog.text == ""
    val = result[result["cls_split"] == "val"]["id"]
    assert small.set_index("id").loc[val[val.str.startswith("TCGA")], "patient"].nunique() == 2
