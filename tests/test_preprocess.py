"""Preprocessing: each slice once, 3-channel PNGs and arrays, manifest; bad inputs fail cleanly."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainmri.data.preprocess import (
    MANIFEST_COLUMNS,
    merge_manifests,
    preprocess_btm,
    preprocess_lgg,
)
from brainmri.errors import InputError
from brainmri.tables import read_manifest

REPO = Path(__file__).resolve().parents[1]
PATIENT = "TCGA_CS_4941_19960909"


# ----------------------------------------------------------------------------- the fixture data


def test_lgg_rows_once_each_sorted_and_consistent_with_arrays_and_pngs(preprocessed_data):
    manifest = read_manifest(preprocessed_data.manifest)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["id"].is_unique
    lgg = manifest[manifest["source"] == "lgg"].reset_index(drop=True)
    raw = preprocessed_data.results_dir / "raw" / "lgg-mri-segmentation"
    raw_images = [p for p in raw.rglob("*.tif") if not p.name.endswith("_mask.tif")]
    assert len(raw_images) == 2 * len(lgg)  # the archive holds each slice twice
    assert all(p.startswith("kaggle_3m/") for p in lgg["original_path"])
    assert lgg[["patient", "slice_index"]].equals(
        lgg[["patient", "slice_index"]]
        .sort_values(["patient", "slice_index"])
        .reset_index(drop=True)
    )
    assert (lgg["array_index"] == np.arange(len(lgg))).all()
    assert (lgg["id"] == lgg["patient"] + "_" + lgg["slice_index"].astype(str)).all()
    assert (lgg["institution"] == lgg["patient"].str.split("_").str[1]).all()

    images = np.load(preprocessed_data.lgg_images)
    masks = np.load(preprocessed_data.lgg_masks)
    assert images.shape == (len(lgg), 64, 64, 3) and images.dtype == np.uint8
    assert masks.shape == (len(lgg), 64, 64) and set(np.unique(masks)) == {0, 1}
    assert (masks.reshape(len(lgg), -1).sum(1) == lgg["tumor_area"]).all()
    assert (lgg["has_tumor"] == (lgg["tumor_area"] > 0).astype(int)).all()
    assert (lgg["label"] == np.where(lgg["has_tumor"] == 1, "tumor", "no_tumor")).all()
    assert 0.2 < lgg["has_tumor"].mean() < 0.5
    for row in lgg.iloc[[0, len(lgg) // 2, -1]].itertuples():
        png = np.asarray(Image.open(preprocessed_data.data_dir / row.image_path))
        mask_png = np.asarray(Image.open(preprocessed_data.data_dir / row.mask_path))
        assert (png == images[row.array_index]).all()
        assert (mask_png == masks[row.array_index] * 255).all()


def test_missing_modalities_are_recorded_per_patient(preprocessed_data):
    lgg = read_manifest(preprocessed_data.manifest).query("source == 'lgg'")
    per_patient = lgg.groupby("patient")["missing_modalities"].agg(set)
    assert (per_patient.map(len) == 1).all()  # one value per patient
    missing = per_patient.map(lambda values: next(iter(values)))
    number = missing.index.str.split("_").str[2].astype(int)
    order = missing.iloc[np.argsort(number)].tolist()
    # Synthetic patients 0 and 7 lack pre-contrast, patient 3 post-contrast (brainmri.synthetic).
    assert order == ["pre-contrast", "", "", "post-contrast", "", "", "", "pre-contrast"]


def test_second_dataset_is_gray_in_three_channels_with_duplicates_grouped(preprocessed_data):
    btm = read_manifest(preprocessed_data.manifest).query("source == 'btm'")
    assert btm.groupby("btm_class").size().to_dict() == {"glioma": 8, "notumor": 8}
    assert set(btm["label"]) == {"tumor", "no_tumor"}
    assert (btm["mask_path"] == "").all() and (btm["tumor_area"] == -1).all()
    assert set(btm["btm_subset"]) == {"Training", "Testing"}
    images = np.load(preprocessed_data.btm_images)
    assert images.shape == (16, 64, 64, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    # The synthetic archive repeats the last image of each class once.
    duplicates = btm[btm["duplicate_group"] != btm["id"]]
    assert len(duplicates) == 2
    for row in duplicates.itertuples():
        first = btm.set_index("id").loc[row.duplicate_group]
        assert first["content_hash"] == row.content_hash
        assert (images[first["array_index"]] == images[row.array_index]).all()
    assert btm["content_hash"].nunique() == 14


# ----------------------------------------------------------------------------- small hand-made data


def tif_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def write_patient(root: Path, patient: str = PATIENT, slices: int = 2, size: int = 40) -> Path:
    folder = root / "kaggle_3m" / patient
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(patient) + slices)
    for n in range(1, slices + 1):
        image = rng.integers(1, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if n == 1:
            mask[5:15, 8:20] = 255
        (folder / f"{patient}_{n}.tif").write_bytes(tif_bytes(image))
        (folder / f"{patient}_{n}_mask.tif").write_bytes(tif_bytes(mask))
    return folder


def run_lgg(raw: Path, out: Path, size: int = 32, threads: int = 1) -> pd.DataFrame:
    return preprocess_lgg(
        raw,
        size,
        out / "png",
        out / "images.npy",
        out / "masks.npy",
        out / "manifest.csv",
        threads,
    )


def test_resizing_is_bilinear_for_images_and_nearest_for_masks(tmp_path):
    folder = write_patient(tmp_path / "raw", slices=1, size=40)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    (folder / f"{PATIENT}_1_mask.tif").write_bytes(tif_bytes(mask))
    manifest = run_lgg(tmp_path / "raw", tmp_path / "out", size=20)
    masks = np.load(tmp_path / "out" / "masks.npy")
    assert set(np.unique(masks)) == {0, 1}
    assert masks[0].sum() == 100 == manifest["tumor_area"].iloc[0]  # 20x20 at half size
    source = np.asarray(Image.open(folder / f"{PATIENT}_1.tif"))
    expected = np.asarray(Image.fromarray(source).resize((20, 20), Image.BILINEAR))
    assert (np.load(tmp_path / "out" / "images.npy")[0] == expected).all()


def test_threads_do_not_change_the_outputs(tmp_path):
    write_patient(tmp_path / "raw", slices=5)
    write_patient(tmp_path / "raw", patient="TCGA_HT_7475_19970918", slices=4)
    one = run_lgg(tmp_path / "raw", tmp_path / "one", threads=1)
    two = run_lgg(tmp_path / "raw", tmp_path / "two", threads=2)
    assert one.equals(two)
    for name in ("images.npy", "masks.npy", "manifest.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert one["patient"].tolist() == [PATIENT] * 5 + ["TCGA_HT_7475_19970918"] * 4


def test_differing_second_copy_warns_and_the_kaggle_3m_copy_wins(tmp_path, caplog):
    raw = tmp_path / "raw"
    folder = write_patient(raw, slices=2)
    copy = raw / "lgg-mri-segmentation" / "kaggle_3m" / PATIENT
    shutil.copytree(folder, copy)
    altered = np.full((40, 40, 3), 7, np.uint8)
    (copy / f"{PATIENT}_2.tif").write_bytes(tif_bytes(altered))
    with caplog.at_level(logging.WARNING):
        manifest = run_lgg(raw, tmp_path / "out", size=40)
    assert len(manifest) == 2
    assert f"{PATIENT}_2.tif differs" in caplog.text
    assert f"{PATIENT}_1.tif differs" not in caplog.text
    images = np.load(tmp_path / "out" / "images.npy")
    assert (images[1] == np.asarray(Image.open(folder / f"{PATIENT}_2.tif"))).all()


def test_btm_accepts_any_mode_and_size(tmp_path):
    root = tmp_path / "raw" / "Training"
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (30, 50), dtype=np.uint8)
    images = {
        "glioma/Tr-gl_0001.jpg": Image.fromarray(gray, "L"),
        "glioma/Tr-gl_0002.png": Image.fromarray(np.dstack([gray] * 3), "RGB"),
        "glioma/Tr-gl_0003.png": Image.fromarray(np.dstack([gray] * 4), "RGBA"),
        "notumor/Tr-no_0001.png": Image.fromarray(gray, "L").convert("P"),
        "notumor/Tr-no_0002.png": Image.fromarray(gray.astype(np.uint16) * 200),
        "meningioma/Tr-me_0001.jpg": Image.fromarray(gray, "L"),  # not used
    }
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    out = tmp_path / "out"
    manifest = preprocess_btm(
        tmp_path / "raw", 24, out / "png", out / "images.npy", out / "manifest.csv", 2
    )
    assert manifest["btm_class"].tolist() == ["glioma"] * 3 + ["notumor"] * 2
    assert manifest["id"].tolist()[0] == "btm_Training_glioma_Tr-gl_0001"
    array = np.load(out / "images.npy")
    assert array.shape == (5, 24, 24, 3)
    # RGB, RGBA and P copies of the same gray pixels hash alike and form one duplicate group.
    assert manifest["duplicate_group"].iloc[1] == manifest["duplicate_group"].iloc[2]
    assert manifest["content_hash"].iloc[2] == manifest["content_hash"].iloc[3]
    assert manifest["content_hash"].nunique() == 3  # JPEG (lossy), the PNG copies, the 16-bit one


def test_merge_manifests_checks_columns_and_unique_ids(tmp_path, preprocessed_data):
    lgg = preprocessed_data.data_dir / "lgg" / "manifest.csv"
    btm = preprocessed_data.data_dir / "btm" / "manifest.csv"
    merged = merge_manifests([lgg, btm])
    assert len(merged) == len(read_manifest(lgg)) + len(read_manifest(btm))
    with pytest.raises(InputError, match="duplicate ids"):
        merge_manifests([lgg, lgg])
    broken = tmp_path / "broken.csv"
    read_manifest(btm).drop(columns="content_hash").to_csv(broken, index=False)
    with pytest.raises(InputError, match=f"{broken}: unexpected columns"):
        merge_manifests([lgg, broken])


# ----------------------------------------------------------------------------- fuzz: bad inputs


def corrupt(folder: Path) -> Path:
    """A deflate-compressed TIFF with garbage in its compressed pixel data."""
    path = folder / f"{PATIENT}_1.tif"
    buffer = io.BytesIO()
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(buffer, format="TIFF", compression="tiff_deflate")
    data = bytearray(buffer.getvalue())
    data[40:400] = bytes(range(256)) + bytes(104)
    path.write_bytes(bytes(data))
    return path


def truncated(folder: Path) -> Path:
    path = folder / f"{PATIENT}_2.tif"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


def no_mask(folder: Path) -> Path:
    (folder / f"{PATIENT}_2_mask.tif").unlink()
    return folder / f"{PATIENT}_2.tif"


def no_image(folder: Path) -> Path:
    (folder / f"{PATIENT}_1.tif").unlink()
    return folder / f"{PATIENT}_1_mask.tif"


def wrong_mask_size(folder: Path) -> Path:
    path = folder / f"{PATIENT}_2_mask.tif"
    path.write_bytes(tif_bytes(np.zeros((20, 40), np.uint8)))
    return path


def gray_image(folder: Path) -> Path:
    path = folder / f"{PATIENT}_2.tif"
    path.write_bytes(tif_bytes(np.zeros((40, 40), np.uint8)))
    return path


def rgba_image(folder: Path) -> Path:
    path = folder / f"{PATIENT}_1.tif"
    path.write_bytes(tif_bytes(np.zeros((40, 40, 4), np.uint8)))
    return path


def zero_bytes(folder: Path) -> Path:
    path = folder / f"{PATIENT}_2_mask.tif"
    path.write_bytes(b"")
    return path


def not_an_image(folder: Path) -> Path:
    path = folder / f"{PATIENT}_1.tif"
    path.write_text("patient,age\nTCGA,42\n")
    return path


def nested_archive(folder: Path) -> Path:
    root = folder.parent.parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as inner:
        for path in sorted(folder.iterdir()):
            inner.write(path, f"kaggle_3m/{PATIENT}/{path.name}")
    shutil.rmtree(root / "kaggle_3m")
    (root / "lgg-mri-segmentation.zip").write_bytes(buffer.getvalue())
    return root


def empty_folder(folder: Path) -> Path:
    root = folder.parent.parent
    shutil.rmtree(root / "kaggle_3m")
    (root / "README.md").write_text("nothing here")
    return root


BAD_LGG = {
    "corrupt": (corrupt, "corrupt or truncated image"),
    "truncated": (truncated, "corrupt or truncated image"),
    "image without mask": (no_mask, "image without its mask"),
    "mask without image": (no_image, "mask without its image"),
    "mask of the wrong size": (wrong_mask_size, "mask size 40x20 differs from its image"),
    "1-channel image": (gray_image, "expected a 3-channel RGB TIFF"),
    "4-channel image": (rgba_image, "with 4 channel(s)"),
    "zero-byte file": (zero_bytes, "empty file (0 bytes)"),
    "text file named .tif": (not_an_image, "not an image file"),
    "nested archive": (nested_archive, "no LGG slices found; expected kaggle_3m/"),
    "wrong archive": (empty_folder, "is this the lgg-mri-segmentation archive?"),
}


@pytest.mark.parametrize("case", sorted(BAD_LGG))
def test_bad_lgg_input_names_the_file_and_leaves_no_output(tmp_path, case):
    damage, fragment = BAD_LGG[case]
    folder = write_patient(tmp_path / "raw", slices=3)
    bad_path = damage(folder)
    out = tmp_path / "out"
    with pytest.raises(InputError) as caught:
        run_lgg(tmp_path / "raw", out, threads=2)
    message = str(caught.value)
    assert message.startswith(f"{bad_path}:"), message
    assert fragment in message
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_btm_image_fails_through_the_script_with_one_line_and_no_output(tmp_path):
    folder = tmp_path / "raw" / "Testing" / "notumor"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "Te-no_0001.jpg")
    (folder / "Te-no_0002.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO / "workflow_scripts" / "preprocess.py"),
        "btm",
        f"--raw-dir={tmp_path / 'raw'}",
        "--array-size=32",
        f"--png-dir={out / 'png'}",
        f"--images={out / 'images.npy'}",
        f"--manifest={out / 'manifest.csv'}",
        "--threads=2",
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error (InputError): {folder / 'Te-no_0002.jpg'}:")
    assert "Traceback" not in result.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_wrong_archive_for_the_second_dataset_says_what_was_expected(tmp_path):
    write_patient(tmp_path / "raw", slices=1)
    with pytest.raises(InputError, match="expected Training/<class>/"):
        preprocess_btm(
            tmp_path / "raw", 32, tmp_path / "png", tmp_path / "i.npy", tmp_path / "m.csv"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# --------------------------------------------- the duplicate kaggle_3m tree: compared, never used


def with_duplicate_tree(raw: Path, slices: int = 3) -> tuple[Path, Path]:
    """A patient in kaggle_3m/ and the same files in lgg-mri-segmentation/kaggle_3m/."""
    folder = write_patient(raw, slices=slices)
    copy = raw / "lgg-mri-segmentation" / "kaggle_3m" / PATIENT
    shutil.copytree(folder, copy)
    return folder, copy


def test_a_mask_missing_from_the_primary_tree_is_not_taken_from_the_duplicate(tmp_path):
    raw = tmp_path / "raw"
    folder, _ = with_duplicate_tree(raw)
    (folder / f"{PATIENT}_2_mask.tif").unlink()
    with pytest.raises(InputError) as caught:
        run_lgg(raw, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{folder / f'{PATIENT}_2.tif'}: image without its mask")
    assert "the duplicate tree lgg-mri-segmentation/kaggle_3m/ has it" in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_truncated_primary_image_is_fatal_even_with_a_good_duplicate(tmp_path):
    raw = tmp_path / "raw"
    folder, _ = with_duplicate_tree(raw)
    bad = truncated(folder)
    with pytest.raises(InputError, match="corrupt or truncated image") as caught:
        run_lgg(raw, tmp_path / "out")
    assert str(caught.value).startswith(f"{bad}:")


def test_files_only_in_the_duplicate_tree_are_reported_and_ignored(tmp_path, caplog):
    raw = tmp_path / "raw"
    _, copy = with_duplicate_tree(raw, slices=3)
    other = "TCGA_HT_7475_19970918"
    write_patient(raw / "lgg-mri-segmentation", patient=other, slices=2)  # only in the copy
    (copy / f"{PATIENT}_3_mask.tif").unlink()  # missing from the copy
    with caplog.at_level(logging.INFO):
        manifest = run_lgg(raw, tmp_path / "out")
    assert manifest["patient"].tolist() == [PATIENT] * 3
    assert manifest["original_path"].str.startswith("kaggle_3m/").all()
    assert "reading the primary tree kaggle_3m/" in caplog.text
    assert "4 files only in the duplicate tree lgg-mri-segmentation/kaggle_3m/ are ignored" in (
        caplog.text
    )
    assert "1 files of the primary tree are missing from the duplicate" in caplog.text
    assert f"e.g. {PATIENT}_3_mask.tif" in caplog.text


def test_errors_name_the_users_archive_and_member_not_the_extracted_copy(tmp_path):
    """fetch_dataset.py (local zip) then preprocess.py, as the rules run them."""
    source = tmp_path / "downloads"
    folder = write_patient(source / "staging", slices=3)
    truncated(folder)
    archive = source / "lgg-mri-segmentation.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted((source / "staging").rglob("*.tif")):
            handle.write(path, path.relative_to(source / "staging").as_posix())
    raw = tmp_path / "results" / "raw" / "lgg-mri-segmentation"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "workflow_scripts" / name), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    fetched = script(
        "fetch_dataset.py",
        "--dataset=lgg-mri-segmentation",
        "--source=local",
        f"--local-dir={source}",
        f"--out-dir={raw}",
        f"--checksums={raw.parent / 'lgg.sha256.tsv'}",
    )
    assert fetched.returncode == 0, fetched.stderr
    out = tmp_path / "results" / "data"
    result = script(
        "preprocess.py",
        "lgg",
        f"--raw-dir={raw}",
        "--array-size=32",
        f"--png-dir={out / 'png'}",
        f"--images={out / 'images.npy'}",
        f"--masks={out / 'masks.npy'}",
        f"--manifest={out / 'manifest.csv'}",
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    member = f"kaggle_3m/{PATIENT}/{PATIENT}_2.tif"
    assert last.startswith(f"error (InputError): {archive}: {member}: corrupt or truncated"), last
    assert str(raw) not in last
