"""The data stage on the real Kaggle sample (../shared/data/kaggle-mini), through the scripts.

Skipped when the sample is absent. 316 LGG slices of 10 patients (each in the archive twice) and
80 glioma + 80 notumor images; preprocessed at 64 px to stay fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = next(
    (
        path
        for path in (
            REPO.parent / "shared" / "data" / "kaggle-mini",
            Path("/work/shared/data/kaggle-mini"),
        )
        if (path / "lgg-mri-segmentation.zip").is_file()
    ),
    None,
)

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        SAMPLE is None, reason="the real sample ../shared/data/kaggle-mini is absent"
    ),
]


def run(script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "workflow_scripts" / script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """fetch (local) -> preprocess (64 px, 2 threads) -> manifest -> patient-level splits."""
    root = tmp_path_factory.mktemp("realdata")
    for dataset in ("lgg-mri-segmentation", "brain-tumor-mri-dataset"):
        run(
            "fetch_dataset.py",
            f"--dataset={dataset}",
            "--source=local",
            f"--local-dir={SAMPLE}",
            "--synthetic={}",
            '--extraction={"max_total_bytes": 2000000000, "max_members": 100000}',
            "--seed=42",
            f"--out-dir={root / 'raw' / dataset}",
            f"--checksums={root / 'raw' / f'{dataset}.sha256.tsv'}",
        )
    for short, dataset in (("lgg", "lgg-mri-segmentation"), ("btm", "brain-tumor-mri-dataset")):
        masks = [f"--masks={root / 'data' / short / 'masks.npy'}"] if short == "lgg" else []
        run(
            "preprocess.py",
            short,
            f"--raw-dir={root / 'raw' / dataset}",
            "--array-size=64",
            f"--png-dir={root / 'data' / short / 'png'}",
            f"--images={root / 'data' / short / 'images.npy'}",
            *masks,
            f"--manifest={root / 'data' / short / 'manifest.csv'}",
            "--threads=2",
        )
    run(
        "build_manifest.py",
        "--parts",
        root / "data" / "lgg" / "manifest.csv",
        root / "data" / "btm" / "manifest.csv",
        f"--output={root / 'data' / 'manifest.csv'}",
    )
    run(
        "make_splits.py",
        f"--manifest={root / 'data' / 'manifest.csv'}",
        "--folds=5",
        "--seed=42",
        f"--splits={root / 'splits' / 'splits.csv'}",
        f"--summary={root / 'splits' / 'summary.tsv'}",
    )
    return root


def test_counts_match_the_sample(results):
    manifest = pd.read_csv(results / "data" / "manifest.csv", keep_default_na=False)
    assert manifest["id"].is_unique
    lgg = manifest[manifest["source"] == "lgg"]
    assert len(lgg) == 316
    assert lgg["has_tumor"].sum() == 132
    assert lgg["patient"].nunique() == 10
    assert lgg.groupby("institution")["patient"].nunique().to_dict() == {
        "CS": 2,
        "DU": 3,
        "FG": 2,
        "HT": 3,
    }
    assert (lgg["missing_modalities"] == "").all()  # none of the 15 such cases is in the sample
    btm = manifest[manifest["source"] == "btm"]
    assert btm["btm_class"].value_counts().to_dict() == {"glioma": 80, "notumor": 80}
    # Both archive copies were extracted; the checksum table lists every file and the zip.
    rows = (results / "raw" / "lgg-mri-segmentation.sha256.tsv").read_text().splitlines()
    assert rows[1].startswith("lgg-mri-segmentation.zip\t")
    assert sum(r.endswith(".tif") or ".tif\t" in r for r in rows) == 4 * 316


def test_patient_level_splits_are_disjoint_and_balanced(results):
    manifest = pd.read_csv(results / "data" / "manifest.csv", keep_default_na=False)
    splits = pd.read_csv(results / "splits" / "splits.csv", keep_default_na=False)
    table = manifest.merge(splits, on="id", validate="one_to_one")
    lgg = table[table["source"] == "lgg"]
    split_sets = {name: set(frame["patient"]) for name, frame in lgg.groupby("cls_split")}
    assert set(split_sets) == {"train", "val", "test"}
    assert not split_sets["train"] & split_sets["test"]
    assert not split_sets["val"] & split_sets["test"]
    assert not split_sets["train"] & split_sets["val"]
    assert (lgg.groupby("patient")["fold"].nunique() == 1).all()
    test_fraction = (lgg["cls_split"] == "test").mean()
    per_patient = lgg.groupby("patient").size().mean() / len(lgg)
    assert abs(test_fraction - 0.2) <= per_patient
