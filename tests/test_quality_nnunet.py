"""nnU-Net and MONAI variants of the quality benchmark: the nnU-Net raw format written by
bench/nnunet_raw.py (nibabel only), the fold's nnU-Net folders (no held-out patient in what
nnU-Net trains on), and, where nnunetv2 / monai are installed (bench/requirements-nnunet.txt),
their training and prediction inside the benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from bench import nnunet_raw as raw
from bench import quality_cv, quality_nnunet

NNUNET_MISSING = quality_nnunet.available()


def monai_missing() -> str | None:
    from bench.quality_monai import available

    return available()


def write_arrays(folder: Path, patients: dict[str, int], size=(8, 6), seed=0) -> pd.DataFrame:
    """``folder/lgg/{images,masks}.npy`` and the manifest rows of ``patients`` (name: slices),
    each patient's slices stored in reverse slice order (so order matters)."""
    rng = np.random.default_rng(seed)
    rows, images, masks = [], [], []
    for patient, slices in patients.items():
        for s in reversed(range(slices)):
            rows.append({"patient": patient, "slice_index": s, "source": "lgg",
                         "array_index": len(rows), "id": f"{patient}_{s}"})  # fmt: skip
            images.append(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            masks.append((rng.random(size) < 0.3).astype(np.uint8))
    (folder / "lgg").mkdir(parents=True, exist_ok=True)
    np.save(folder / "lgg" / "images.npy", np.stack(images))
    np.save(folder / "lgg" / "masks.npy", np.stack(masks))
    return pd.DataFrame(rows)


def test_a_patient_round_trips_through_the_raw_format(tmp_path):
    """Images (3 channels), labels and spacing of one patient survive nnU-Net's raw layout;
    slices come in slice order; H != W and three different spacings catch a swapped axis."""
    rows = write_arrays(tmp_path / "data", {"TCGA_AA_0001": 5})
    (case,) = raw.patient_cases(tmp_path / "data", rows, ("TCGA_AA_0001",))
    assert list(case.rows["slice_index"]) == [0, 1, 2, 3, 4]
    stored = np.load(tmp_path / "data" / "lgg" / "images.npy")
    assert (case.images[0] == stored[4]).all()  # slice 0 was stored last
    spacing = (0.5, 0.8, 3.0)
    files = raw.write_case(tmp_path / "imagesTr", tmp_path / "labelsTr", case, spacing)
    assert [f.name for f in files] == [
        "TCGA_AA_0001_0000.nii.gz", "TCGA_AA_0001_0001.nii.gz", "TCGA_AA_0001_0002.nii.gz",
        "TCGA_AA_0001.nii.gz",
    ]  # fmt: skip
    images, mask, read_spacing = raw.read_case(tmp_path / "imagesTr", tmp_path / "labelsTr",
                                               "TCGA_AA_0001")  # fmt: skip
    assert images.shape == (5, 8, 6, 3) and images.dtype == np.uint8
    assert (images == case.images).all() and (mask == case.mask).all()
    assert read_spacing == pytest.approx(spacing)
    assert set(np.unique(mask)) <= {0, 1}


@pytest.mark.skipif(NNUNET_MISSING is not None, reason=str(NNUNET_MISSING))
def test_nnunet_reads_the_cases_as_slice_row_column(tmp_path):
    """nnU-Net's default reader of .nii.gz (SimpleITKIO) sees (channel, slice, row, column)
    with spacing (slice, row, column): its 2d configuration trains on the slices."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rows = write_arrays(tmp_path / "data", {"TCGA_AA_0001": 4})
    (case,) = raw.patient_cases(tmp_path / "data", rows, ("TCGA_AA_0001",))
    raw.write_case(tmp_path / "img", tmp_path / "lab", case, (0.5, 0.8, 3.0))
    names = [str(tmp_path / "img" / f"TCGA_AA_0001_{c:04d}.nii.gz") for c in range(3)]
    data, properties = SimpleITKIO().read_images(names)
    assert (data == case.images.transpose(3, 0, 1, 2)).all()
    assert tuple(properties["spacing"]) == pytest.approx((3.0, 0.5, 0.8))
    seg, _ = SimpleITKIO().read_seg(str(tmp_path / "lab" / "TCGA_AA_0001.nii.gz"))
    assert (seg[0] == case.mask).all()


def fold_bench(tmp_path: Path):
    patients = {f"TCGA_A{i}_000{i}": 3 + i % 2 for i in range(6)}
    data = tmp_path / "data"
    rows = write_arrays(data, patients)
    names = sorted(patients)
    fold = quality_cv.Fold(0, tuple(names[:3]), tuple(names[3:4]), tuple(names[4:]))
    return SimpleNamespace(data=data, rows=rows), fold


def test_no_held_out_patient_reaches_nnunets_training_folder(tmp_path):
    """The fold's raw dataset holds its train and inner validation patients only, the split
    validates on the inner validation patients, and the held-out (test) patients are only
    among the cases to predict (FLAIR-only copies: pre and post replaced by FLAIR)."""
    bench, fold = fold_bench(tmp_path)
    root = tmp_path / "fold0"
    quality_nnunet.write_fold(bench, fold, root)
    dataset = root / "nnUNet_raw" / "Dataset001_LGG"
    training, everyone = set(fold.train + fold.val), set(bench.rows["patient"])
    assert raw.cases_in(dataset / "imagesTr", everyone) == training
    assert raw.cases_in(dataset / "labelsTr", everyone) == training
    assert not raw.cases_in(root / "nnUNet_raw", fold.test)
    assert not raw.cases_in(root / "nnUNet_preprocessed", fold.test)
    description = json.loads((dataset / "dataset.json").read_text())
    assert description["numTraining"] == len(training)
    assert description["channel_names"] == {"0": "pre-contrast", "1": "FLAIR",
                                            "2": "post-contrast"}  # fmt: skip
    split = json.loads((root / "nnUNet_preprocessed" / "Dataset001_LGG" / "splits_final.json")
                       .read_text())  # fmt: skip
    assert split == [{"train": list(fold.train), "val": list(fold.val)}]
    assert raw.cases_in(root / "inputs" / "test", everyone) == set(fold.test)
    assert raw.cases_in(root / "inputs" / "val", everyone) == set(fold.val)
    images, mask, _ = raw.read_case(root / "inputs" / "flair", None, fold.test[0])
    original, _, _ = raw.read_case(root / "inputs" / "test", None, fold.test[0])
    assert mask is None and (images[..., 1] == original[..., 1]).all()
    assert (images[..., 0] == original[..., 1]).all() and (images[..., 2] == original[..., 1]).all()
    assert not (original[..., 0] == original[..., 1]).all()


def test_a_split_with_a_patient_in_train_and_val_is_refused(tmp_path):
    from brainmri.errors import InputError

    with pytest.raises(InputError, match="TCGA_X"):
        raw.write_splits(tmp_path, ("TCGA_X", "TCGA_Y"), ("TCGA_X",))


def tiny_benchmark(tmp_path: Path, variants: dict, extra: list[str]) -> Path:
    import yaml

    from bench import quality
    from brainmri.data.synthetic import write_lgg_archive

    source = tmp_path / "data"
    write_lgg_archive(source / "lgg-mri-segmentation.zip", 6, 8, seed=3)
    spec = tmp_path / "v.yaml"
    spec.write_text(yaml.safe_dump({"reference": next(iter(variants)), "variants": variants}))
    work = tmp_path / "work"
    quality.main(["--data", str(source), "--work", str(work), "--variants", str(spec),
                  "--size", "32", "--folds", "2", "--inner-val", "0.34", "--threads", "1",
                  "--n-boot", "20", *extra])  # fmt: skip
    return work


@pytest.mark.slow
@pytest.mark.skipif(NNUNET_MISSING is not None, reason=str(NNUNET_MISSING))
def test_nnunet_variant_trains_within_its_budget_on_training_patients_only(tmp_path):
    """One outer fold through nnU-Net's planning, budgeted training and predictor: nothing of
    a held-out patient in its preprocessed data, the training ended by the CPU budget, and
    probabilities stored for the held-out slices in the benchmark's row order."""
    work = tiny_benchmark(tmp_path, {"nnunet": {"kind": "nnunet"}},
                          ["--budget", "4", "--fold", "0"])  # fmt: skip
    plan = pd.read_csv(work / "plan.csv")
    own = plan[plan["fold"] == 0]
    test = set(own[own["role"] == "test"]["patient"])
    training = set(own[own["role"] != "test"]["patient"])
    root = work / "models" / "nnunet" / "fold0"
    preprocessed = root / "nnUNet_preprocessed" / "Dataset001_LGG" / "nnUNetPlans_2d"
    assert raw.cases_in(preprocessed, training | test) == training
    assert not raw.cases_in(root / "nnUNet_raw", test)
    info = json.loads((root / "info.json").read_text())
    assert info["epochs_run"] >= 1 and info["seconds"] < 4 + 4  # at most about one epoch over
    assert info["nnunetv2"] and info["prepare_cpu_seconds"] > 0
    stored = np.load(work / "probs" / "nnunet-tta1" / "fold0-test.npy")
    rows = pd.read_csv(work / "data32" / "manifest.csv")
    assert stored.shape == ((rows["patient"].isin(test)).sum(), 32, 32)
    assert stored.dtype == np.uint8 and stored.max() > 0


@pytest.mark.slow
def test_monai_variant_trains_and_predicts(tmp_path):
    reason = monai_missing()
    if reason:
        pytest.skip(reason)
    work = tiny_benchmark(tmp_path, {"monai": {"kind": "monai", "batch_size": 8}},
                          ["--budget", "3"])  # fmt: skip
    patients = pd.read_csv(work / "patients.csv", keep_default_na=False)
    assert set(patients["condition"]) == {"original", "flair_only"}
    assert patients.groupby("condition")["patient"].nunique().tolist() == [6, 6]
    for fold in (0, 1):
        info = json.loads((work / "models" / "monai" / f"fold{fold}" / "info.json").read_text())
        assert info["kind"] == "monai" and info["epochs_run"] >= 1 and info["seconds"] < 3 + 3
        history = pd.read_csv(work / "models" / "monai" / f"fold{fold}" / "history.csv")
        assert history["best"].sum() >= 1 and info["best_epoch"] in set(history["epoch"])


def test_a_full_run_skips_frameworks_that_are_not_installed(monkeypatch):
    """Without nnunetv2 / monai, `make quality` (no --only) runs every other variant and
    leaves those out; named with --only they are kept (and fail with the install line)."""
    from test_quality_bench import shipped_bench

    from bench import quality, quality_monai

    bench = shipped_bench("quality_variants.yaml")
    bench.args.variants = "v.yaml"
    monkeypatch.setattr(quality_nnunet, "available", lambda: "nnunetv2 is not installed")
    monkeypatch.setattr(quality_monai, "available", lambda: None)
    names = quality.select(bench, None)
    assert "nnunet" not in names and "nnunet_no_tta" not in names
    assert "monai" in names and "recipe" in names
    assert quality.select(bench, ["nnunet"]) == ["nnunet"]
