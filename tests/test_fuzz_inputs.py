"""A fuzzer for the readers of other people's files (Hypothesis): valid inputs of each kind made
from the real sample (a slice folder, a NIfTI, a DICOM series, PNG / TIFF / JPG images, a Kaggle
archive), then mutated -- header fields set to wrong types, out-of-range values, emptied or
removed as anonymisers do; byte ranges overwritten; files truncated; names changed. Every case
must end in a result or a one-line InputError naming the input: never another exception, never
a file outside the output folder, never a partial output, never more memory than the caps allow.

The default profile (``make test``) tries a few dozen cases per reader; ``--hypothesis-profile
long`` (tests/conftest.py) tries FUZZ_EXAMPLES per reader, 4,000 unless set (docs/reliability.md
has the long runs).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import write_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmread
from test_volume import FakeModels

from brainmri.data.archives import ExtractionLimits, extract_archive
from brainmri.data.limits import Limits
from brainmri.errors import InputError
from brainmri.inference.predict import prepare
from brainmri.inference.volume import predict_volumes
from brainmri.inference.volume_io import read_input

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "kaggle-mini"
ARCHIVE = SAMPLE / "lgg-mri-segmentation.zip"
LIMITS = Limits(max_in_plane=256, max_slices=64, max_bytes=4 << 20, max_image_pixels=1 << 20)
MEMORY_BOUND = 3 * LIMITS.max_bytes + (24 << 20)  # numpy + Python allocations of one case
FUZZ = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    deadline=None,
)


def real_slices(count: int = 4, side: int = 64) -> list[np.ndarray]:
    """``count`` RGB slices of the sample's first patient (generated noise without the sample),
    resized to ``side`` so that a case takes milliseconds."""
    if ARCHIVE.is_file():
        with zipfile.ZipFile(ARCHIVE) as archive:
            names = sorted(
                n for n in archive.namelist() if n.endswith(".tif") and "_mask" not in n
            )[:count]
            images = [Image.open(io.BytesIO(archive.read(n))).convert("RGB") for n in names]
        return [np.asarray(i.resize((side, side))) for i in images]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(count)]


SLICES = real_slices()
VOLUME = np.stack(SLICES, axis=2).transpose(1, 0, 2, 3)  # (x, y, z, 3)


def one_line_refusal(error: InputError, given: object) -> None:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    assert text.startswith(str(given)) or str(given) in text, (given, text)


def bounded(call):
    """Run ``call`` with Python and numpy allocations traced; its peak must stay in bound."""
    tracemalloc.start()
    try:
        return call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= MEMORY_BOUND, f"peak {peak / 2**20:.0f} MiB"


def predict_one(tmp: Path, given: Path) -> None:
    """Predict one patient into ``tmp/out``: either its complete folder or one failure line
    and nothing; nothing is written outside ``tmp/out``."""
    before = {p for p in tmp.rglob("*") if "out" not in p.relative_to(tmp).parts}
    out = tmp / "out"
    readers = [(str(given), lambda: read_input(given, "axial", LIMITS))]
    failures = bounded(
        lambda: predict_volumes(readers, FakeModels(), 32, 0.5, out / "patients", out / "v.csv")
    )
    after = {p for p in tmp.rglob("*") if "out" not in p.relative_to(tmp).parts}
    assert after == before, after ^ before
    written = list((out / "patients").iterdir())
    if failures:
        assert len(failures) == 1 and written == []
        assert "\n" not in failures[0][1] and "Traceback" not in failures[0][1]
    else:
        (folder,) = written
        assert (folder / "slices.csv").is_file() and (folder / "overview.png").is_file()
    assert not [p for p in out.rglob(".*.tmp")]


def mutate_bytes(data: bytes, draw) -> bytes:
    """Overwrite a byte range, truncate, or insert bytes."""
    data = bytearray(data)
    kind = draw(st.sampled_from(["overwrite", "truncate", "insert"]))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "truncate":
        return bytes(data[:at])
    chunk = draw(st.binary(min_size=1, max_size=16))
    if kind == "insert":
        return bytes(data[:at] + chunk + data[at:])
    data[at : at + len(chunk)] = chunk
    return bytes(data)


WEIRD_NUMBERS = st.one_of(
    st.integers(-(2**31), 2**31),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**15, 2**16, 2**31 - 1]),
)


@pytest.fixture
def fresh(tmp_path_factory):
    """A new empty folder per Hypothesis case (the test's tmp_path is shared by its cases)."""
    return lambda: tmp_path_factory.mktemp("case")


def make_nifti(tmp: Path) -> Path:
    image = nib.Nifti1Image(VOLUME.astype(np.int16) * 3, np.diag([0.9, 0.9, 3.0, 1.0]))
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp / "case.nii")
    return tmp / "case.nii"


def make_dicom(tmp: Path) -> Path:
    study = tmp / "study"
    flair = (VOLUME[..., 1].astype(np.uint16) * 4)[:32, :32]
    write_series(study / "flair", flair, "AX FLAIR", spacing=(1.0, 1.0), thickness=1.0)
    post = flair[::-1].copy()
    write_series(study / "post", post, "T1 POST", spacing=(1.0, 1.0), thickness=1.0, seed=1)
    return study


def make_slices(tmp: Path) -> Path:
    folder = tmp / "TCGA_XX_0001_20000101"
    folder.mkdir()
    for n, image in enumerate(SLICES, 1):
        Image.fromarray(image).save(folder / f"{folder.name}_{n}.tif")
    return folder


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """Each reader once on its valid input, before any case is measured: the lazy imports and
    caches of first use (pydicom's decoders, Pillow's fonts) are not a case's memory."""
    for make in (make_nifti, make_dicom, make_slices):
        tmp = tmp_path_factory.mktemp("warm")
        given_path = make(tmp)
        readers = [(str(given_path), lambda p=given_path: read_input(p, "axial", LIMITS))]
        out = tmp / "out"
        failures = predict_volumes(readers, FakeModels(), 32, 0.5, out / "patients", out / "v.csv")
        assert failures == [], failures
    prepare(make_slices(tmp_path_factory.mktemp("warm")).iterdir().__next__(), 32)


NIFTI_FIELDS = ["dim", "pixdim", "datatype", "bitpix", "scl_slope", "scl_inter", "vox_offset"]
NIFTI_FIELDS += ["qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b"]
NIFTI_FIELDS += ["qoffset_x", "xyzt_units", "intent_code", "dim_info"]


@FUZZ
@given(data=st.data())
def test_nifti_mutations_end_in_a_volume_or_one_line(fresh, data):
    tmp = fresh()
    path = make_nifti(tmp)
    raw = path.read_bytes()
    if data.draw(st.booleans(), "header field"):
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
        field = data.draw(st.sampled_from(NIFTI_FIELDS), "field")
        shape = header[field].shape
        values = data.draw(st.lists(WEIRD_NUMBERS, min_size=8, max_size=8), "values")
        # A value the field's type cannot hold is not written.
        with contextlib.suppress(ValueError, OverflowError, TypeError):
            header[field] = np.resize(np.asarray(values), shape) if shape else values[0]
        raw = header.binaryblock + raw[348:]
    else:
        raw = mutate_bytes(raw, data.draw)
    path.write_bytes(raw)
    predict_one(tmp, path)


DICOM_KEYWORDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"]
DICOM_KEYWORDS += ["SamplesPerPixel", "NumberOfFrames", "ImageOrientationPatient"]
DICOM_KEYWORDS += ["ImagePositionPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept"]
DICOM_KEYWORDS += ["SeriesInstanceUID", "SeriesDescription", "PhotometricInterpretation"]
DICOM_KEYWORDS += ["PixelData", "SliceThickness", "PlanarConfiguration"]
DICOM_VALUES = st.one_of(
    st.none(),
    st.just(""),
    st.text(max_size=12),
    WEIRD_NUMBERS,
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=7),
    st.binary(max_size=64),
)


@FUZZ
@given(data=st.data())
def test_dicom_mutations_end_in_a_volume_or_one_line(fresh, data):
    tmp = fresh()
    study = make_dicom(tmp)
    files = sorted(study.rglob("IM*"))
    victim = data.draw(st.sampled_from(files), "file")
    if data.draw(st.booleans(), "header field"):
        dataset = dcmread(victim)
        keyword = data.draw(st.sampled_from(DICOM_KEYWORDS), "keyword")
        value = data.draw(DICOM_VALUES, "value")
        try:
            if value is None:
                delattr(dataset, keyword) if keyword in dataset else None
            else:
                setattr(dataset, keyword, value)
            dataset.save_as(victim)
        except Exception:
            return
    else:
        victim.write_bytes(mutate_bytes(victim.read_bytes(), data.draw))
    predict_one(tmp, study)


@FUZZ
@given(data=st.data())
def test_slice_folder_mutations_end_in_a_volume_or_one_line(fresh, data):
    tmp = fresh()
    folder = make_slices(tmp)
    files = sorted(folder.iterdir())
    victim = data.draw(st.sampled_from(files), "file")
    kind = data.draw(st.sampled_from(["bytes", "rename", "replace"]), "kind")
    if kind == "bytes":
        victim.write_bytes(mutate_bytes(victim.read_bytes(), data.draw))
    elif kind == "rename":
        name = data.draw(st.text(min_size=1, max_size=20), "name")
        try:
            victim.rename(folder / name)
        except (OSError, ValueError):
            return  # a name the file system refuses: not an input anyone can give
    else:
        side = data.draw(st.tuples(st.integers(1, 80), st.integers(1, 80)), "size")
        mode = data.draw(st.sampled_from(["L", "RGB", "RGBA", "I;16", "F", "1", "P"]), "mode")
        Image.new(mode, side).save(victim, format="TIFF")
    predict_one(tmp, folder)


@FUZZ
@given(data=st.data())
def test_image_mutations_end_in_a_prepared_image_or_one_line(fresh, data):
    tmp = fresh()
    kind = data.draw(st.sampled_from(["PNG", "TIFF", "JPEG"]), "format")
    path = tmp / f"scan.{kind.lower()}"
    Image.fromarray(SLICES[0]).save(path, format=kind)
    path.write_bytes(mutate_bytes(path.read_bytes(), data.draw))
    try:
        prepared = bounded(lambda: prepare(path, 32))
    except InputError as error:
        one_line_refusal(error, path)
        return
    assert prepared.image.shape == (32, 32, 3) and prepared.image.dtype == np.uint8


MEMBER_NAMES = st.one_of(
    st.text(min_size=1, max_size=30),
    st.sampled_from(["../evil.tif", "/abs.tif", "a/../../b", "kaggle_3m/../../x", "C:\\x", ""]),
)


@FUZZ
@given(data=st.data())
def test_archive_mutations_extract_completely_or_not_at_all(fresh, data):
    tmp = fresh()
    archive = tmp / "lgg.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for n, image in enumerate(SLICES[:2], 1):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="TIFF")
            out.writestr(f"kaggle_3m/TCGA_XX_0001/TCGA_XX_0001_{n}.tif", buffer.getvalue())
        if data.draw(st.booleans(), "odd member"):
            with contextlib.suppress(ValueError, OSError, IndexError):  # names zipfile refuses
                out.writestr(data.draw(MEMBER_NAMES, "member name"), b"x" * 10)
    archive.write_bytes(mutate_bytes(archive.read_bytes(), data.draw))
    destination = tmp / "out" / "raw"
    before = sorted(p for p in tmp.rglob("*") if "out" not in p.relative_to(tmp).parts)
    try:
        names = extract_archive(archive, destination, ExtractionLimits(max_total_bytes=1 << 22))
    except InputError as error:
        one_line_refusal(error, archive)
        assert not destination.exists()
    else:
        assert (
            sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file())
            == names
        )
    after = sorted(p for p in tmp.rglob("*") if "out" not in p.relative_to(tmp).parts)
    assert after == before
    shutil.rmtree(tmp)
