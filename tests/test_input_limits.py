"""Input size limits (brainmri.data.limits): bombs of every kind -- a small .nii.gz claiming
4000 x 4000 x 300 voxels, DICOM headers claiming huge slices or thousands of frames, PNG and TIFF
decompression bombs, a slice folder of too many slices -- are refused from their headers in one
line naming the file, the claimed size and the cap, with the peak memory of the command small."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import test_volume
from dicom_series import write_series
from helpers import REPO, SCRIPTS
from PIL import Image
from pydicom import dcmread
from test_volume import affine_of, three_files

from brainmri.data.limits import Limits
from brainmri.data.preprocess import open_image
from brainmri.errors import InputError
from brainmri.inference.volume_io import read_input

checkpoints = test_volume.checkpoints  # the fixture: a tiny classifier and U-Net
ZEROS = 1 << 24


def nifti_bomb(path: Path, shape=(4000, 4000, 300)) -> Path:
    """A complete, valid .nii.gz of zeros with the header's shape (uint8): one gzip member for
    the header, then the same 16 MiB-of-zeros member repeated (gzip members concatenate)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    total = int(np.prod(shape))
    zeros = gzip.compress(bytes(ZEROS), compresslevel=9)
    with path.open("wb") as handle:
        handle.write(gzip.compress(header.binaryblock + b"\0" * 4))
        for _ in range(total // ZEROS):
            handle.write(zeros)
        handle.write(gzip.compress(bytes(total % ZEROS)))
    return path


def png_bomb(path: Path, width=12000, height=12000) -> Path:
    """An RGB PNG of zeros, 432 MB decoded (under Pillow's own bomb error at 179 M pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0, then the row
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def dicom_bomb(folder: Path, **claims) -> Path:
    """A real FLAIR series, one of whose files then claims ``claims`` (Rows, NumberOfFrames...)."""
    voxels = np.full((16, 16, 4), 100, dtype=np.uint16)
    write_series(folder, voxels, "AX FLAIR")
    victim = sorted(folder.iterdir())[0]
    dataset = dcmread(victim)
    for keyword, value in claims.items():
        setattr(dataset, keyword, value)
    dataset.save_as(victim)
    return victim


def peak_memory_run(*command) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``command`` under a fresh Python parent; -> (its result, its peak RSS in KiB)."""
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(r.returncode)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", probe, *map(str, command)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    peak = int(result.stdout.rsplit("PEAK", 1)[1])
    return result, peak


READERS = """
import sys
from pathlib import Path
from brainmri.data.preprocess import open_image
from brainmri.errors import InputError
from brainmri.inference.volume_io import read_input
for name in sys.argv[1:]:
    path = Path(name)
    try:
        open_image(path) if path.suffix == ".png" else read_input(path, "axial")
        print("READ", path)
    except InputError as error:
        print(error)
"""
READER_BOUND_KB = 400 * 1024  # the smallest bomb here (the PNG) decodes to 432 MB


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """One bomb of each kind -> {input given: (the file named, what it claims, the cap)}."""
    root = tmp_path_factory.mktemp("bombs")
    nifti = nifti_bomb(root / "bomb.nii.gz")
    assert nifti.stat().st_size < 8_000_000  # 4.7 MB: 4.8 GB of zeros, compressed (the issue)
    assert nib.load(nifti).shape == (4000, 4000, 300)
    wide = dicom_bomb(root / "wide", Rows=60000, Columns=60000)
    frames = dicom_bomb(root / "frames", NumberOfFrames=100000)
    slices = root / "TCGA_XX_0001_20000101"  # a slice folder whose second slice is a TIFF bomb
    slices.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(slices / f"{slices.name}_1.tif")
    tiff = slices / f"{slices.name}_2.tif"
    png_bomb(tiff)  # PNG data under a .tif name: Pillow goes by the content
    png = png_bomb(root / "bomb.png")
    return {
        nifti: (nifti, "header claims slices of 4000 x 4000 voxels", "cap of 1024 per in-plane"),
        wide.parent: (wide, "header claims slices of 60000 x 60000 voxels", "cap of 1024"),
        frames.parent: (frames, "header claims 100000 slices", "cap of 1000"),
        slices: (tiff, "header claims 12000 x 12000 pixels", "cap of 16777216 pixels"),
        png: (png, "header claims 12000 x 12000 pixels", "cap of 16777216 pixels"),
    }


def test_readers_refuse_every_bomb_within_the_memory_bound(bombs):
    result, peak = peak_memory_run(sys.executable, "-c", READERS, *bombs)
    lines = result.stdout.splitlines()[:-1]
    assert result.returncode == 0 and len(lines) == len(bombs), result.stderr
    for line, (path, claim, cap) in zip(lines, bombs.values(), strict=True):
        assert line.startswith(f"{path}: ") and claim in line and cap in line, line
    assert peak < READER_BOUND_KB, f"peak resident memory {peak / 1024:.0f} MiB"


def test_predict_volume_skips_every_bomb_in_one_line_and_goes_on(bombs, checkpoints, tmp_path):
    """The bombs cost the command no more memory than the good patient alone (the models and
    PyTorch take about 0.9 GB here); each is one line; the good patient is written."""
    good = three_files(tmp_path / "good", affine_of())
    volumes = [p for p in bombs if p.suffix != ".png"]
    peaks = {}
    for name, inputs in (("good", [good]), ("all", [good, *volumes])):
        out = tmp_path / name
        result, peaks[name] = peak_memory_run(
            sys.executable,
            SCRIPTS / "predict_volume.py",
            *("--inputs", *inputs, "--classifiers", checkpoints[0]),
            *("--segmenters", checkpoints[1], "--method", "majority"),
            *("--classifier-threshold", 0.5, "--segmentation-threshold", 0.5),
            *("--csv", out / "volumes.csv", "--patients-dir", out / "patients"),
        )
    assert result.returncode == 1, result.stderr  # the good patient is kept; skips: status 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.split("4 of 5 patient(s) skipped:\n", 1)[1].strip().splitlines()
    for line, given in zip(lines, volumes, strict=True):
        path, claim, cap = bombs[given]
        assert line.startswith(str(path)) and claim in line and cap in line, line
    assert peaks["all"] < peaks["good"] + 64 * 1024, peaks
    assert sorted(p.name for p in (out / "patients").iterdir()) == ["good"]
    table = pd.read_csv(out / "volumes.csv", keep_default_na=False)
    assert list(table["error"] != "") == [False, True, True, True, True]


def test_png_bomb_given_to_predict_is_refused_in_its_row(bombs, checkpoints, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 64), 90, dtype=np.uint8)).save(images / "ok.png")
    os.link(next(p for p in bombs if p.suffix == ".png"), images / "bomb.png")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "predict.py"),
            "--input-dir",
            str(images),
            "--classifiers",
            str(checkpoints[0]),
            "--segmenters",
            str(checkpoints[1]),
            "--method",
            "majority",
            "--classifier-threshold",
            "0.5",
            "--segmentation-threshold",
            "0.5",
            "--output",
            str(out / "p.csv"),
            "--masks-dir",
            str(out / "m"),
            "--overlays-dir",
            str(out / "o"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert "Traceback" not in result.stderr, result.stderr
    table = pd.read_csv(out / "p.csv", keep_default_na=False).set_index("file")
    error = table.loc["bomb.png", "error"]
    assert "bomb.png: header claims 12000 x 12000 pixels, more than the cap of 16777216" in error
    assert table.loc["ok.png", "error"] == ""


def test_caps_are_configurable_and_name_the_key(tmp_path):
    small = Limits(max_in_plane=64, max_slices=10, max_bytes=100_000, max_image_pixels=100)
    folder = three_files(tmp_path / "p", affine_of())  # 80 x 72 x 20 float32 voxels
    with pytest.raises(
        InputError,
        match=r"case_flair\.nii\.gz: header claims slices of 80 x 72 "
        r"voxels, more than the cap of 64 .*max_in_plane",
    ):
        read_input(folder, "axial", small)
    with pytest.raises(InputError, match=r"header claims 20 slices, more than the cap of 10 "):
        read_input(folder, "axial", Limits(max_slices=10))
    with pytest.raises(InputError, match=r"80 x 72 x 20 voxels \(450.0 KiB decoded\).*max_bytes"):
        read_input(folder, "axial", Limits(max_bytes=100_000))
    # Sliced along another axis, the same file has other in-plane axes and slice count.
    with pytest.raises(InputError, match=r"header claims 80 slices"):
        read_input(folder, "sagittal", Limits(max_slices=72))
    assert read_input(folder, "axial").slices.shape == (20, 72, 80, 3)
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(tmp_path / "i.png")
    with pytest.raises(InputError, match=r"i\.png: header claims 10 x 20 pixels.* cap of 100 "):
        open_image(tmp_path / "i.png", small)
    kaggle = tmp_path / "TCGA_XX_0002_20000101"
    kaggle.mkdir()
    for n in range(1, 13):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(kaggle / f"{kaggle.name}_{n}.tif")
    with pytest.raises(InputError, match=r"0101: holds 12 slices, more than the cap of 10"):
        read_input(kaggle, "axial", small)
    with pytest.raises(InputError, match=r"0101: slices claim 8 x 8 x 12 voxels"):
        read_input(kaggle, "axial", Limits(max_bytes=2000))
    assert Limits.from_json('{"max_slices": 5}') == Limits(max_slices=5)
    for bad in ('{"max_slice": 5}', '{"max_slices": 0}', "[1]"):
        with pytest.raises(ValueError):
            Limits.from_json(bad)


def test_dicom_series_of_too_many_slices_is_refused_before_decoding(tmp_path):
    write_series(tmp_path / "p", np.zeros((8, 8, 12), np.uint16), "AX FLAIR")
    with pytest.raises(InputError, match=r"its series claims 12 slices, more than the cap of 10"):
        read_input(tmp_path / "p", "axial", Limits(max_slices=10))
    with pytest.raises(InputError, match=r"p: holds 12 files, more than 10 x predict.limits"):
        read_input(tmp_path / "p", "axial", Limits(max_slices=1))


def test_two_dimensional_nifti_is_checked_too(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    path = tmp_path / "flat.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + bytes(1000)))
    with pytest.raises(InputError, match=r"flat\.nii\.gz: header claims slices of 30000 x 30000"):
        read_input(path, "axial")
