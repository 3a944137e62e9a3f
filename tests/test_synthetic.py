"""Synthetic stand-ins: the Kaggle layout, MRI-like content and byte-identical archives."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from brainmri.data.synthetic import INSTITUTIONS, write_btm_archive, write_lgg_archive

REPO = Path(__file__).resolve().parents[1]
SLICE = re.compile(r"^kaggle_3m/(TCGA_([A-Z]{2})_\d{4}_\d{8})/\1_(\d+)\.tif$")


def patient_number(folder: str) -> int:
    """Synthetic patients are numbered in generation order: TCGA_<inst>_<number>_<date>."""
    return int(folder.split("_")[2])


def read_tif(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(archive.read(name))))


def test_lgg_archive_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_lgg_archive(
            tmp_path / f"{name}.zip", patients=2, slices_per_patient=4, seed=seed, size=32
        )
    a, b, c = ((tmp_path / f"{n}.zip").read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_lgg_archive_has_the_kaggle_layout_twice(tmp_path):
    path = tmp_path / "lgg.zip"
    write_lgg_archive(path, patients=6, slices_per_patient=6, seed=1, size=48)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        slices = [n for n in names if SLICE.match(n)]
        patients = sorted({SLICE.match(n)[1] for n in slices}, key=patient_number)
        assert len(patients) == 6
        # Institutions round-robin from the fixed list, in patient order.
        assert [p.split("_")[1] for p in patients] == [INSTITUTIONS[i % 5] for i in range(6)]
        for name in slices:
            assert name.replace(".tif", "_mask.tif") in names
            # The real archive repeats the whole tree under lgg-mri-segmentation/.
            assert "lgg-mri-segmentation/" + name in names
            assert archive.read(name) == archive.read("lgg-mri-segmentation/" + name)
        assert "kaggle_3m/data.csv" in names
        data_csv = archive.read("kaggle_3m/data.csv").decode().splitlines()
        assert data_csv[0].startswith("Patient,") and len(data_csv) == 7
        assert len(names) == 2 * (2 * len(slices) + 2)
        image = read_tif(archive, slices[0])
        mask = read_tif(archive, slices[0].replace(".tif", "_mask.tif"))
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
        assert all(info.date_time == (2020, 1, 1, 0, 0, 0) for info in archive.infolist())


def test_lgg_tumors_are_contiguous_bright_flair_blobs_in_about_a_third_of_slices(tmp_path):
    path = tmp_path / "lgg.zip"
    write_lgg_archive(path, patients=5, slices_per_patient=12, seed=2, size=64)
    by_patient: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if match := SLICE.match(name):
                image = read_tif(archive, name)
                mask = read_tif(archive, name.replace(".tif", "_mask.tif")) > 0
                by_patient.setdefault(match[1], []).append((int(match[3]), image, mask))
    tumor_slices = total = 0
    flair_inside, flair_outside = [], []
    for slices in by_patient.values():
        slices.sort(key=lambda item: item[0])
        flags = [bool(mask.any()) for _, _, mask in slices]
        positions = np.flatnonzero(flags)
        assert len(positions) > 0
        assert (np.diff(positions) == 1).all(), "tumor slices must be one contiguous range"
        tumor_slices += len(positions)
        total += len(slices)
        for _, image, mask in slices:
            if mask.sum() > 20:
                flair_inside.append(image[..., 1][mask].mean())
                brain = (image[..., 1] > 40) & ~mask
                flair_outside.append(image[..., 1][brain].mean())
    assert 0.2 <= tumor_slices / total <= 0.5
    assert np.mean(flair_inside) > np.mean(flair_outside) + 40


def test_some_patients_lack_a_modality_replaced_by_flair(tmp_path):
    path = tmp_path / "lgg.zip"
    write_lgg_archive(path, patients=8, slices_per_patient=4, seed=0, size=32)
    equal = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if match := SLICE.match(name):
                image = read_tif(archive, name).astype(int)
                pre, flair, post = image[..., 0], image[..., 1], image[..., 2]
                flags = equal.setdefault(match[1], [True, True])
                flags[0] &= bool((pre == flair).all())
                flags[1] &= bool((post == flair).all())
    patients = sorted(equal, key=patient_number)
    assert equal[patients[0]] == [True, False]  # patient 0: no pre-contrast
    assert equal[patients[3]] == [False, True]  # patient 3: no post-contrast
    assert equal[patients[1]] == [False, False]


def test_btm_archive_layout_modes_sizes_and_reproducibility(tmp_path):
    write_btm_archive(tmp_path / "a.zip", images_per_class=6, seed=9)
    write_btm_archive(tmp_path / "b.zip", images_per_class=6, seed=9)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    pattern = re.compile(
        r"^(Training|Testing)/(glioma|meningioma|notumor|pituitary)/(Tr|Te)-\w\w_\d{4}\.jpg$"
    )
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        names = archive.namelist()
        assert len(names) == 4 * 6 and all(pattern.match(n) for n in names)
        assert {n.split("/")[0] for n in names} == {"Training", "Testing"}
        images = [Image.open(io.BytesIO(archive.read(n))) for n in names]
    assert {image.format for image in images} == {"JPEG"}
    assert {image.mode for image in images} == {"L", "RGB"}
    assert len({image.size for image in images}) > 1


def test_fetch_synthetic_writes_extracted_tree_and_sorted_checksums(tmp_path):
    out = tmp_path / "raw" / "lgg-mri-segmentation"
    tsv = tmp_path / "raw" / "lgg-mri-segmentation.sha256.tsv"
    command = [
        sys.executable,
        str(REPO / "workflow_scripts" / "fetch_dataset.py"),
        "--dataset=lgg-mri-segmentation",
        "--source=synthetic",
        "--local-dir=",
        '--synthetic={"patients": 2, "slices_per_patient": 4, "images_per_class": 2}',
        '--extraction={"max_total_bytes": 100000000, "max_members": 1000}',
        "--seed=5",
        f"--out-dir={out}",
        f"--checksums={tsv}",
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert rows[0] == ["path", "bytes", "sha256"]
    assert rows[1][0] == "lgg-mri-segmentation.zip"
    files = rows[2:]
    assert [r[0] for r in files] == sorted(r[0] for r in files)
    extracted = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == len(extracted) > 0
    for name, size, digest in files:
        path = tmp_path / "raw" / name
        assert path.stat().st_size == int(size)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # No temporary archive or scratch folder is left next to the outputs.
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted([out.name, tsv.name])
