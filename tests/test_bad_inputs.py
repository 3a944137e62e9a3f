"""Fuzz-style bad inputs to preprocessing: each ends in a clear error, with no partial output."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from helpers import run_script

PATIENT = "TCGA_CS_4941_19960909"


def tif(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def good_patient(root) -> None:
    folder = root / "kaggle_3m" / PATIENT
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in (1, 2):
        (folder / f"{PATIENT}_{n}.tif").write_bytes(tif(rng.integers(0, 255, (32, 32, 3), np.uint8)))
        mask = np.zeros((32, 32), np.uint8)
        mask[5:9, 5:9] = 255
        (folder / f"{PATIENT}_{n}_mask.tif").write_bytes(tif(mask))


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])


def wrong_channels(path):
    path.write_bytes(tif(np.zeros((32, 32), np.uint8)))


def not_an_image(path):
    path.write_text("this is not a TIFF at all")


def zero_bytes(path):
    path.write_bytes(b"")


def wrong_mask_size(path):
    mask = path.with_name(path.name.replace(".tif", "_mask.tif"))
    mask.write_bytes(tif(np.zeros((16, 16), np.uint8)))


def missing_mask(path):
    path.with_name(path.name.replace(".tif", "_mask.tif")).unlink()


def nested_archive(path):
    """The whole dataset hidden in a zip inside the folder: not expanded, so nothing is found."""
    root = path.parents[2]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted((root / "kaggle_3m").rglob("*.tif")):
            archive.write(file, file.relative_to(root))
    shutil.rmtree(root / "kaggle_3m")
    (root / "inner.zip").write_bytes(buffer.getvalue())


CASES = {
    "truncated TIFF": (truncate, "corrupt or truncated"),
    "wrong channel count": (wrong_channels, "3-channel"),
    "non-image with an image extension": (not_an_image, "not an image"),
    "zero-byte file": (zero_bytes, "empty file"),
    "mask of the wrong size": (wrong_mask_size, "mask size"),
    "image without its mask": (missing_mask, "without its mask"),
    "nested archive": (nested_archive, "no LGG slices found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_lgg_input_fails_clearly_without_outputs(tmp_path, case):
    raw = tmp_path / "raw"
    good_patient(raw)
    broken = raw / "kaggle_3m" / PATIENT / f"{PATIENT}_2.tif"
    damage, message = CASES[case]
    damage(broken)
    out = tmp_path / "data"
    result = run_script(
        "preprocess.py", "lgg", "--raw-dir", raw, "--image-size", 32, "--png-dir", out / "png",
        "--images", out / "images.npy", "--masks", out / "masks.npy",
        "--manifest", out / "manifest.csv",
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    if case != "nested archive":
        assert f"{PATIENT}_2" in result.stderr  # names the file
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_good_input_passes(tmp_path):
    raw = tmp_path / "raw"
    good_patient(raw)
    out = tmp_path / "data"
    run_script("preprocess.py", "lgg", "--raw-dir", raw, "--image-size", 32, "--png-dir",
               out / "png", "--images", out / "images.npy", "--masks", out / "masks.npy",
               "--manifest", out / "manifest.csv", check=True)
    assert np.load(out / "images.npy").shape == (2, 32, 32, 3)


def test_wrong_archive_for_the_second_dataset(tmp_path):
    raw = tmp_path / "raw"
    good_patient(raw)  # an LGG tree where the second dataset is expected
    out = tmp_path / "data"
    result = run_script("preprocess.py", "btm", "--raw-dir", raw, "--png-dir", out / "png",
                        "--images", out / "images.npy", "--manifest", out / "manifest.csv")
    assert result.returncode == 1
    assert "brain-tumor-mri-dataset" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_empty_archive_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "lgg-mri-segmentation.zip").write_bytes(b"")
    result = run_script("fetch_dataset.py", "--dataset", "lgg-mri-segmentation", "--source", "local",
                        f"--local-dir={tmp_path / 'a'}", "--out-dir", tmp_path / "out",
                        "--checksums", tmp_path / "c.tsv")
    assert result.returncode == 1 and "empty" in result.stderr
    assert not (tmp_path / "out").exists()
