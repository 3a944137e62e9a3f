"""Data stage: synthetic archives, preprocessing, manifest and splits."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainmri.preprocess import MANIFEST_COLUMNS, read_manifest
from brainmri.splits import make_splits
from brainmri.synthetic import write_lgg_archive
from helpers import run_script


def test_synthetic_archive_has_the_kaggle_layout_twice_and_is_reproducible(tmp_path):
    write_lgg_archive(tmp_path / "a.zip", patients=3, slices_per_patient=4, seed=5, size=32)
    write_lgg_archive(tmp_path / "b.zip", patients=3, slices_per_patient=4, seed=5, size=32)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    names = zipfile.ZipFile(tmp_path / "a.zip").namelist()
    slices = [n for n in names if n.startswith("kaggle_3m/TCGA_") and not n.endswith("_mask.tif")]
    copies = [n for n in names if n.startswith("lgg-mri-segmentation/kaggle_3m/TCGA_")]
    assert slices and len(copies) == 2 * len(slices)
    assert all(n.replace(".tif", "_mask.tif") in names for n in slices)


def test_preprocessing_counts_each_slice_once_and_writes_binary_masks(preprocessed_data):
    manifest = read_manifest(preprocessed_data.manifest)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    lgg = manifest[manifest["source"] == "lgg"]
    raw_slices = [p for p in (preprocessed_data.results_dir / "raw" / "lgg-mri-segmentation").rglob("*.tif") if "_mask" not in p.name]
    assert len(lgg) * 2 == len(raw_slices)  # the archive holds every slice twice
    assert lgg["id"].is_unique and manifest["id"].is_unique
    images = np.load(preprocessed_data.data_dir / "lgg" / "images.npy")
    masks = np.load(preprocessed_data.data_dir / "lgg" / "masks.npy")
    assert images.shape == (len(lgg), 64, 64, 3) and images.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert (masks.reshape(len(masks), -1).sum(1) == lgg["tumor_area"].to_numpy()).all()
    assert (lgg["has_tumor"] == (lgg["tumor_area"] > 0)).all()
    row = lgg.iloc[0]
    png = np.asarray(Image.open(preprocessed_data.data_dir / row["image_path"]))
    mask_png = np.asarray(Image.open(preprocessed_data.data_dir / row["mask_path"]))
    assert png.shape == (64, 64, 3) and (png == images[row["array_index"]]).all()
    assert set(np.unique(mask_png)) <= {0, 255}


def test_missing_modalities_are_detected(preprocessed_data):
    lgg = read_manifest(preprocessed_data.manifest).query("source == 'lgg'")
    per_patient = lgg.groupby("patient")["missing_modalities"].first()
    by_number = {int(name.split("_")[2]): value for name, value in per_patient.items()}
    # The generator drops pre-contrast for patient 0 (id 1000), post-contrast for patient 3.
    assert by_number[1000] == "pre-contrast"
    assert by_number[1000 + 37 * 3] == "post-contrast"
    assert by_number[1000 + 37] == "" and by_number[1000 + 37 * 2] == ""


def test_second_dataset_is_gray_in_three_channels_with_duplicates_grouped(preprocessed_data):
    btm = read_manifest(preprocessed_data.manifest).query("source == 'btm'")
    assert set(btm["btm_class"]) == {"glioma", "notumor"}
    assert set(btm["btm_subset"]) == {"Training", "Testing"}
    images = np.load(preprocessed_data.data_dir / "btm" / "images.npy")
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    duplicated = btm[btm["duplicate_group"] != btm["id"]]
    assert len(duplicated) == 2  # one exact duplicate per class in the synthetic archive
    splits = pd.read_csv(preprocessed_data.splits).set_index("id")
    for _, row in duplicated.iterrows():
        assert splits.loc[row["id"], "cls_split"] == splits.loc[row["duplicate_group"], "cls_split"]


def test_patient_level_splits_are_disjoint_stratified_and_reproducible(preprocessed_data, tmp_path):
    manifest = read_manifest(preprocessed_data.manifest)
    splits = make_splits(manifest, folds=2, seed=1).merge(manifest, on="id")
    lgg = splits[splits["source"] == "lgg"]
    patients = {name: set(frame["patient"]) for name, frame in lgg.groupby("cls_split")}
    assert patients["test"].isdisjoint(patients["train"] | patients["val"])
    assert patients["train"].isdisjoint(patients["val"])
    folds = {k: set(f["patient"]) for k, f in lgg[lgg["fold"] >= 0].groupby("fold")}
    assert folds[0].isdisjoint(folds[1])
    assert set(lgg.loc[lgg["seg_split"] == "test", "patient"]) == patients["test"]
    assert (splits.loc[splits["source"] == "btm", "seg_split"] == "unused").all()
    # Test share within one patient's slices of 20 %.
    largest = lgg.groupby("patient").size().max()
    assert abs((lgg["cls_split"] == "test").sum() - 0.2 * len(lgg)) <= largest
    for run in ("a", "b"):
        run_script("make_splits.py", "--manifest", preprocessed_data.manifest, "--folds", 2,
                   "--seed", 3, "--splits", tmp_path / f"{run}.csv",
                   "--summary", tmp_path / f"{run}.tsv", check=True)
    digest = [hashlib.sha256((tmp_path / f"{r}.csv").read_bytes()).hexdigest() for r in "ab"]
    assert digest[0] == digest[1]
    other = run_script("make_splits.py", "--manifest", preprocessed_data.manifest, "--folds", 2,
                       "--seed", 4, "--splits", tmp_path / "c.csv", "--summary", tmp_path / "c.tsv")
    assert other.returncode == 0
    assert (tmp_path / "c.csv").read_bytes() != (tmp_path / "a.csv").read_bytes()


def test_slice_level_split_mixes_patients(preprocessed_data):
    manifest = read_manifest(preprocessed_data.manifest)
    splits = make_splits(manifest, level="slice", folds=2, seed=1).merge(manifest, on="id")
    lgg = splits[splits["source"] == "lgg"]
    test_patients = set(lgg.loc[lgg["cls_split"] == "test", "patient"])
    train_patients = set(lgg.loc[lgg["cls_split"] == "train", "patient"])
    assert test_patients & train_patients  # the paper's leak, kept for comparison
    assert abs((lgg["cls_split"] == "test").mean() - 0.2) < 0.05


def test_too_many_folds_is_a_config_error_naming_the_key(preprocessed_data, tmp_path):
    result = run_script("make_splits.py", "--manifest", preprocessed_data.manifest, "--folds", 50,
                        "--splits", tmp_path / "s.csv", "--summary", tmp_path / "s.tsv")
    assert result.returncode == 1
    assert "split.folds" in result.stderr
    assert not (tmp_path / "s.csv").exists()
