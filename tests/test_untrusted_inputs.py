"""Prediction on a stranger's data: names that would reach outside the output folder, one bad
patient among good ones, memory bounded by the stored size, compressed DICOM bombs, formulas in
CSV cells, NaN images, signals, two writers, symlinks out of an input folder, a sagittal series
asked for axial slices and mathtext in figure text -- each refused in one line or handled, and
nothing outside the output folder touched."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import jpeg_ls
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import test_volume
from dicom_series import write_series
from helpers import REPO, SCRIPTS
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless
from test_input_limits import peak_memory_run
from test_volume import FakeModels, affine_of, blob_volume, cli_args, three_files

from brainmri.data.limits import BYTES_PER_VOXEL
from brainmri.errors import InputError
from brainmri.inference.codestream import check_frame, jpeg2000_frame, jpeg_frame
from brainmri.inference.predict import prepare
from brainmri.inference.volume import predict_volumes
from brainmri.inference.volume_io import read_input
from brainmri.io import atomic_path
from brainmri.untrusted import csv_safe, output_lock, safe_name

checkpoints = test_volume.checkpoints  # the fixture: a tiny classifier and U-Net
SIZE = test_volume.SIZE


def reader(path, axis="axial"):
    return (str(path), lambda: read_input(path, axis))


def run(readers, out):
    failures = predict_volumes(
        readers, FakeModels(), SIZE, 0.5, out / "patients", out / "volumes.csv"
    )
    return failures, pd.read_csv(out / "volumes.csv", keep_default_na=False)


def kaggle_folder(folder, stem, count=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(1, count + 1):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{stem}_{n}.tif")
    return folder


def workspace(tmp_path):
    """A working folder with something precious beside the output folder."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "models.pt").write_text("precious")
    return work, work / "out"


# --- names and paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", ".hidden", "a\nb", "x" * 300])
def test_safe_name_refuses_what_cannot_name_an_output(name):
    with pytest.raises(InputError, match="cannot name an output"):
        safe_name(name, "patient name")


def test_atomic_path_refuses_a_way_up_and_removes_only_its_own(tmp_path):
    (tmp_path / "keep").write_text("x")
    for bad in (tmp_path / "out" / "..", "out/..", "", "/"):
        with pytest.raises(InputError, match="not a file or folder name"), atomic_path(bad):
            pass
    assert (tmp_path / "keep").read_text() == "x"
    target = tmp_path / "folder"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "keep"]  # no trash left


@pytest.mark.parametrize("stem", ["..", "."])
def test_a_patient_named_a_way_up_is_refused_and_nothing_outside_is_touched(tmp_path, stem):
    work, out = workspace(tmp_path)
    good = three_files(tmp_path / "good", affine_of())
    bad = kaggle_folder(tmp_path / "slices", stem)  # .._1.tif: the patient '..'
    nifti = tmp_path / "nifti" / f"{stem}.nii.gz"  # ...nii.gz: the patient '.'
    nifti.parent.mkdir()
    nib.save(nib.Nifti1Image(np.stack(blob_volume()[:3], axis=-1), affine_of()), nifti)
    failures, table = run([reader(good), reader(bad), reader(nifti)], out)
    assert (work / "models.pt").read_text() == "precious"
    assert sorted(p.name for p in work.iterdir()) == ["models.pt", "out"]
    assert sorted(p.name for p in (out / "patients").iterdir()) == ["good"]
    assert [label for label, _ in failures] == [str(bad), str(nifti)]
    assert all("cannot name an output" in message for _, message in failures)
    assert list(table["patient"]) == ["good", "", ""]


def test_inputs_dot_dot_names_the_folder_it_stands_for(tmp_path, monkeypatch):
    patient = three_files(tmp_path / "p7", affine_of())
    (patient / "inner").mkdir()
    monkeypatch.chdir(patient / "inner")
    assert read_input(type(patient)(".."), "axial").name == "p7"


def test_cli_name_dot_dot_is_one_line_exit_1_and_the_parent_survives(checkpoints, tmp_path):
    work, out = workspace(tmp_path)
    good = three_files(tmp_path / "good", affine_of())
    flair = good / "case_flair.nii.gz"
    args = cli_args(checkpoints, out, good)
    result = subprocess.run(
        [
            sys.executable,
            SCRIPTS / "predict_volume.py",
            *map(str, args),
            "--flair",
            str(flair),
            "--name",
            "..",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "1 of 2 patient(s) skipped" in result.stderr and "'..'" in result.stderr
    assert (work / "models.pt").read_text() == "precious"
    assert sorted(p.name for p in (out / "patients").iterdir()) == ["good"]
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["input"]) == [str(flair)]


# --- one bad patient does not lose the batch ---------------------------------------------------


def broken_nifti(path, affine):
    """A one-file NIfTI (.nii) whose header's sform is ``affine`` (qform off), written into the
    header bytes as a broken exporter would (nibabel itself writes only sane affines)."""
    pre, flair, post, _ = blob_volume()
    nib.save(nib.Nifti1Image(np.stack([pre, flair, post], axis=-1), np.eye(4)), path)
    raw = path.read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    path.write_bytes(header.binaryblock + raw[348:])
    return path


def test_any_error_skips_one_patient_and_the_rest_complete(tmp_path):
    good = three_files(tmp_path / "good", affine_of())
    singular = broken_nifti(tmp_path / "singular.nii", np.zeros((4, 4)))
    nan = np.eye(4)
    nan[0, 0] = np.nan
    not_a_number = broken_nifti(tmp_path / "nan.nii", nan)
    frames = tmp_path / "frames"
    write_series(frames, np.full((16, 16, 4), 100, dtype=np.uint16), "AX FLAIR")
    victim = sorted(frames.iterdir())[0]
    dataset = dcmread(victim)
    dataset.NumberOfFrames = "7777"
    dataset.save_as(victim)
    victim.write_bytes(victim.read_bytes().replace(b"7777", b"abc "))  # pydicom won't write it

    def crash():
        raise RuntimeError("a reader's own bug")

    readers = [reader(singular), reader(not_a_number), reader(frames), ("crash", crash)]
    failures, table = run([*readers, reader(good)], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "patients").iterdir()) == ["good"]
    messages = [m for _, m in failures]
    assert len(messages) == 4 and all("\n" not in m for m in messages)
    assert "affine" in messages[0] and "affine" in messages[1]
    assert "NumberOfFrames 'abc' is not a whole number" in messages[2]
    assert messages[3] == "crash: RuntimeError: a reader's own bug"
    assert list(table["error"] == "") == [False, False, False, False, True]


def test_cli_exits_1_when_every_patient_is_refused_and_keeps_tracebacks_out(checkpoints, tmp_path):
    singular = broken_nifti(tmp_path / "singular.nii", np.zeros((4, 4)))
    out = tmp_path / "out"
    args = [str(a) for a in cli_args(checkpoints, out, singular)]
    result = subprocess.run(
        [sys.executable, SCRIPTS / "predict_volume.py", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "1 of 1 patient(s) skipped" in result.stderr
    allowed = subprocess.run(
        [sys.executable, SCRIPTS / "predict_volume.py", *args, "--allow-skipped"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert allowed.returncode == 0, allowed.stderr
    assert (out / "failures.log").is_file()


# --- memory bounded by the stored size --------------------------------------------------------

READ_ONE = """
import resource, sys
from pathlib import Path
from brainmri.data.limits import Limits
from brainmri.inference.volume_io import read_input
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
volume = read_input(Path(sys.argv[1]), "axial", Limits(max_bytes=1 << 31))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("GROWTH", after - before, volume.slices.shape)
"""
MB = 1 << 20


def reading_growth_kb(path) -> int:
    result = subprocess.run(
        [sys.executable, "-c", READ_ONE, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split("GROWTH", 1)[1].split()[0])


def scaled_volume(path, shape, slope):
    """A .nii.gz of int16 noise in a head-sized box (small on disk, ``shape`` x 2 bytes stored)."""
    data = np.zeros(shape, dtype=np.int16)
    data[10:20, 10:20] = 7  # a constant box: the values do not matter, the sizes do
    image = nib.Nifti1Image(data, affine_of((1.0, 1.0, 1.0)))
    image.header.set_slope_inter(slope, 3.0)
    nib.save(image, path)
    return int(np.prod(shape)) * 2


def test_reading_a_volume_costs_at_most_twice_its_stored_size(tmp_path):
    """Peak growth of reading (RSS, a fresh process) <= 2 x stored bytes + 300 MB, with
    scl_slope set (nibabel's own read would make a float64 copy of everything: 4 x + more)."""
    one = tmp_path / "one.nii.gz"
    stored = scaled_volume(one, (512, 512, 100, 3), 1.5)
    assert reading_growth_kb(one) * 1024 <= 2 * stored + 300 * MB
    three = tmp_path / "three"
    three.mkdir()
    stored = sum(
        scaled_volume(three / f"case_{s}.nii.gz", (512, 512, 100), 2.0)
        for s in ("pre", "flair", "post")
    )
    assert reading_growth_kb(three) * 1024 <= 2 * stored + 300 * MB


def test_predicting_a_volume_costs_what_the_rules_mem_mb_assumes(checkpoints, tmp_path):
    """predict_volume's peak over a tiny patient's, for a 512 x 512 x 100 int16 patient, stays
    within volume_memory_mb's per-voxel terms (2 x the file as stored + 9 bytes a voxel)."""
    peaks = {}
    for name, shape in (("tiny", (40, 36, 10)), ("big", (512, 512, 100))):
        folder = tmp_path / name
        folder.mkdir()
        for sequence in ("pre", "flair", "post"):
            stored = scaled_volume(folder / f"case_{sequence}.nii.gz", shape, 1.0)
        out = tmp_path / f"out_{name}"
        result, peaks[name] = peak_memory_run(
            sys.executable, SCRIPTS / "predict_volume.py", *cli_args(checkpoints, out, folder)
        )
        assert result.returncode == 0, result.stderr
    voxels = 512 * 512 * 100
    assert (peaks["big"] - peaks["tiny"]) * 1024 <= 2 * stored + BYTES_PER_VOXEL * voxels, peaks


def big_png(path, side=4096):
    image = np.zeros((side, side), dtype=np.uint8)
    image[side // 4 : side // 2, side // 4 : side // 2] = 200
    Image.fromarray(image).save(path)


def test_predict_memory_does_not_grow_with_the_number_of_images(checkpoints, tmp_path):
    peaks = {}
    for count in (2, 8):
        folder = tmp_path / f"in{count}"
        folder.mkdir()
        for k in range(count):
            big_png(folder / f"scan_{k}.png")
        out = tmp_path / f"out{count}"
        result, peaks[count] = peak_memory_run(
            sys.executable,
            SCRIPTS / "predict.py",
            *("--input-dir", folder, "--classifiers", checkpoints[0]),
            *("--segmenters", checkpoints[1], "--method", "majority"),
            *("--classifier-threshold", 0.5, "--segmentation-threshold", 0.5),
            *("--output", out / "p.csv", "--masks-dir", out / "m", "--overlays-dir", out / "o"),
        )
        assert result.returncode == 0, result.stderr
    # A kept 4096^2 original costs 48 MiB: six more of them would add 288 MiB.
    assert peaks[8] < peaks[2] + 100 * 1024, peaks


# --- compressed DICOM -------------------------------------------------------------------------


def jpeg_ls_bomb(victim, side=16384):
    """The file's pixels as JPEG-LS whose frame header claims ``side`` x ``side``."""
    dataset = dcmread(victim)
    stream = bytearray(jpeg_ls.encode(np.full((16, 16), 7, dtype=np.uint16)))
    sof = stream.index(b"\xff\xf7")
    stream[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([bytes(stream)])
    dataset.save_as(victim, enforce_file_format=True)


def test_compressed_frames_larger_than_the_header_are_refused_before_decoding(tmp_path):
    folder = tmp_path / "study"
    write_series(folder, np.full((16, 16, 4), 100, dtype=np.uint16), "AX FLAIR")
    victim = sorted(folder.iterdir())[0]
    jpeg_ls_bomb(victim)
    with pytest.raises(InputError) as caught:
        read_input(folder, "axial")
    assert str(caught.value) == (
        f"{victim}: its compressed pixel data hold a 16384 x 16384 x 1 frame where the header "
        "says 16 x 16 x 1; refused before decoding"
    )


def test_codestream_headers_are_read_as_decoders_read_them(tmp_path):
    image = Image.fromarray(np.zeros((24, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "a.jpg")
    assert jpeg_frame((tmp_path / "a.jpg").read_bytes()) == (24, 40, 3)
    assert jpeg_frame(jpeg_ls.encode(np.zeros((24, 40), dtype=np.uint8)).tobytes()) == (24, 40, 1)
    image.save(tmp_path / "a.j2k", format="JPEG2000")
    assert jpeg2000_frame((tmp_path / "a.j2k").read_bytes()) == (24, 40, 3)
    rle = (1).to_bytes(4, "little") + bytes(60)
    with pytest.raises(InputError, match="1 RLE segments where 2 are expected"):
        check_frame("x.dcm", "1.2.840.10008.1.2.5", rle, 4, 4, 1, 16)


# --- the smaller ones -------------------------------------------------------------------------


def test_csv_cells_from_input_names_are_not_formulas(tmp_path):
    name = '=HYPERLINK("x","y")'
    patient = three_files(tmp_path / name, affine_of())
    _, table = run([reader(patient)], tmp_path / "out")
    assert table["patient"][0] == "'" + name
    assert table["input"][0] == str(patient)  # starts with "/": left as it is
    assert [csv_safe(v) for v in ("-1", "+a", "@b", "\tc", "ok")] == [
        "'-1",
        "'+a",
        "'@b",
        "'\tc",
        "ok",
    ]


def test_a_float_image_of_nan_is_refused(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)).save(path)
    with pytest.raises(InputError, match=r"nan\.tif: 64 NaN or infinite pixel"):
        prepare(path, 16)


def test_a_thin_strip_is_refused_before_it_is_padded_to_a_huge_square(tmp_path):
    """17728 x 64 pixels pass a cap on width x height, but the square they are padded to is
    314 M pixels (found by the fuzzer: one changed byte of a JPEG's frame header)."""
    path = tmp_path / "strip.png"
    Image.new("L", (64, 17728)).save(path)
    with pytest.raises(InputError, match="padded to a 17728 x 17728 square"):
        prepare(path, 32)


SIGTERM_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_volume import FakeModels
from brainmri.inference.volume import predict_volumes
from brainmri.inference.volume_io import read_input
from brainmri.io import run_cli
out = Path(sys.argv[2])
def killed():
    os.kill(os.getpid(), signal.SIGTERM)
    return read_input(Path(sys.argv[1]), "axial")
good = (sys.argv[1], lambda: read_input(Path(sys.argv[1]), "axial"))
def main():
    predict_volumes([good, ("killed", killed)], FakeModels(), 64, 0.5, out / "patients",
                    out / "volumes.csv")
run_cli(main)
"""


def test_sigterm_during_prediction_leaves_no_temporary_folder(tmp_path):
    good = three_files(tmp_path / "good", affine_of())
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(good), str(out), str(REPO / "tests")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []  # no .patients.*.tmp, and the lock is gone


def test_a_second_writer_of_the_same_output_is_refused_in_one_line(tmp_path):
    good = three_files(tmp_path / "good", affine_of())
    out = tmp_path / "out"
    with output_lock(out / "patients"), pytest.raises(InputError, match="another prediction"):
        run([reader(good)], out)
    failures, _ = run([reader(good)], out)  # once the first has ended, it goes through
    assert failures == []


def test_symlinks_out_of_an_input_folder_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_series(elsewhere, np.full((16, 16, 4), 100, dtype=np.uint16), "AX FLAIR")
    study = tmp_path / "study"
    write_series(study, np.full((16, 16, 4), 90, dtype=np.uint16), "AX FLAIR")
    outside = sorted(elsewhere.iterdir())[0]
    (study / "extra").symlink_to(outside)
    with pytest.raises(InputError, match=r"a symlink to .* outside the input folder"):
        read_input(study, "axial")
    slices = kaggle_folder(tmp_path / "p1", "p1")
    (slices / "p1_9.tif").symlink_to(tmp_path / "elsewhere" / outside.name)
    with pytest.raises(InputError, match="outside the input folder"):
        read_input(slices, "axial")


def test_a_thick_sagittal_series_is_refused_not_resliced_into_axial(tmp_path):
    folder = tmp_path / "sagittal"
    voxels = np.full((16, 16, 4), 100, dtype=np.uint16)
    write_series(folder, voxels, "SAG FLAIR", row_dir=(0, 1, 0), col_dir=(0, 0, -1), thickness=5.0)
    with pytest.raises(InputError, match=r"stretched 5\.0:1; .*--axis sagittal"):
        read_input(folder, "axial")
    assert read_input(folder, "sagittal").slices.shape == (4, 16, 16, 3)


def test_isotropic_volumes_are_reoriented_with_the_mask_in_the_input_geometry(tmp_path):
    pre, flair, post, blob = blob_volume(shape=(40, 36, 30), center=(20, 15, 14), radii=(7, 5, 6))
    path = tmp_path / "iso.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([pre, flair, post], -1), affine_of((1.0, 1.0, 1.0))), path)
    failures, _table = run([reader(path, "coronal")], tmp_path / "out")
    assert failures == []
    mask = np.asanyarray(nib.load(tmp_path / "out" / "patients" / "iso" / "mask.nii.gz").dataobj)
    assert mask.shape == blob.shape
    assert 2 * (mask.astype(bool) & blob).sum() / (mask.sum() + blob.sum()) > 0.85


def test_figure_text_from_the_data_is_not_mathtext(tmp_path):
    from brainmri.reporting.plotting import error_gallery, save_figure

    image = np.zeros((16, 16, 3), dtype=np.uint8)
    items = [("$\\foo{$_1", image, np.zeros((16, 16), bool), 0.9)]
    figure = error_gallery({"false positives": items}, "errors")
    save_figure(figure, tmp_path / "gallery.png")
    assert (tmp_path / "gallery.png").stat().st_size > 0


def test_the_rules_keep_the_good_outputs_when_a_patient_is_skipped():
    for rule_file in ("volume.smk", "report.smk"):
        text = (REPO / "rules" / rule_file).read_text()
        assert "--allow-skipped" in text, rule_file
