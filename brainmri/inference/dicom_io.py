"""A patient as a folder of DICOM files: the three sequences as voxel arrays on one grid, with the
affine (RAS, as NIfTI) that puts a mask back onto the DICOM grid.

The rule, in order:

1. Every file under the folder (any nesting; names starting with ``.`` are skipped as the
   operating system's) must be DICOM; a ``DICOMDIR`` is skipped. Headers are read without pixel
   data and checked against the size caps (``predict.limits``) before anything is decoded.
2. Files are grouped into series by ``SeriesInstanceUID``. Each series' ``SeriesDescription``
   (else ``ProtocolName``) is matched against the ordered rules ``predict.dicom.series`` (regular
   expressions, case-insensitive; the first rule that matches names the sequence); series no
   rule matches (localizers, DWI, ...) are ignored and listed in the log. FLAIR is required; a
   missing pre- or post-contrast series is replaced by FLAIR, as for NIfTI.
3. A series' slices are ordered by their position along the slice normal (``ImagePositionPatient``
   · the cross product of the two ``ImageOrientationPatient`` directions), never by file name or
   ``InstanceNumber``; their spacing must be even.
4. Voxel ``(i, j, k)`` is column ``i``, row ``j`` of slice ``k``; the affine maps it to LPS
   millimetres from the DICOM geometry and is flipped to RAS (NIfTI's convention). The
   sequences must share FLAIR's grid (the models see the three sequences of one voxel together).

Bad input (a non-DICOM file, mixed slice sizes in a series, missing spacing or orientation, an
undecodable transfer syntax, two series for one sequence) raises :class:`InputError` naming the
file and the problem.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError

from brainmri.data.limits import DEFAULT as DEFAULT_LIMITS
from brainmri.data.limits import Limits, check_file_size, check_volume
from brainmri.errors import InputError, error_text
from brainmri.inference.codestream import check_frame
from brainmri.inference.stored import Stored, unscaled
from brainmri.untrusted import check_inside

log = logging.getLogger(__name__)

# (sequence, pattern) in order; the first match names a series. Config: predict.dicom.series.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    ("FLAIR", r"flair"),
    ("pre-contrast", r"\bpre\b|pre[-_ ]?(contrast|gd|gad)|native|\bnon[-_ ]?contrast"),
    ("post-contrast", r"post|\+ ?c\b|\bgd\b|gad|contrast|\bce\b|\bc\+"),
    ("pre-contrast", r"t1"),
)
SeriesRules = tuple[tuple[str, str], ...]
SEQUENCES = ("pre-contrast", "FLAIR", "post-contrast")  # the channels, as in the LGG TIFFs
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
POSITION_TOLERANCE = 0.01  # of the slice spacing: how even the slice positions must be
GRID_TOLERANCE_MM = 0.01
FILES_PER_SLICE_CAP = 10  # a study folder holds at most 10 x max_slices files (other series too)


@dataclass
class DicomSeries:
    """One sequence's series: the headers (no pixel data) in slice order, and its grid."""

    sequence: str
    uid: str
    description: str
    files: list[Path]  # in slice order
    headers: list[Dataset]  # in slice order, without pixel data
    affine: np.ndarray  # voxel (column, row, slice) -> RAS mm
    shape: tuple[int, int, int]  # columns, rows, slices


def rules_from_settings(settings: list[dict] | None) -> SeriesRules:
    """``predict.dicom.series`` ([{sequence, pattern}, ...]) as rules; each pattern compiled."""
    if not settings:
        return DEFAULT_RULES
    rules = []
    for item in settings:
        sequence, pattern = item["sequence"], item["pattern"]
        if sequence not in ("pre-contrast", "FLAIR", "post-contrast"):
            raise ValueError(f"unknown sequence {sequence!r} in predict.dicom.series")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"bad pattern {pattern!r} in predict.dicom.series ({error})") from None
        rules.append((sequence, pattern))
    return tuple(rules)


def _listed(folder: Path) -> list[Path]:
    """The files under ``folder`` (any nesting), hidden ones (the system's) left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    """The files of a study folder; a symlink leading out of it is refused."""
    return [check_inside(p, folder) for p in _listed(folder)]


def _int(path: Path, header: Dataset, keyword: str, default: int) -> int:
    """A header's whole-number attribute (``default`` when absent or empty); InputError for a
    value that is not one (anonymisers and broken exporters write anything)."""
    value = "?"
    try:
        value = header.get(keyword, default)  # pydicom converts the text here (and may fail)
        number = int(value if value not in (None, "") else default)
    except (TypeError, ValueError, OverflowError) as error:
        shown = str(value)[:40] if value != "?" else error_text(error)
        raise InputError(f"{path}: {keyword} {shown!r} is not a whole number") from None
    if number < 0:
        raise InputError(f"{path}: {keyword} {number} is negative")
    return number


def is_dicom_file(path: Path) -> bool:
    """The DICOM preamble's ``DICM`` marker at byte 128 (Part 10 files)."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def has_dicom(folder: Path) -> bool:
    return any(is_dicom_file(p) for p in _listed(folder))


def _dcmread(path: Path, **options) -> Dataset:
    """pydicom's reader on the file's bytes in memory (the file is capped by max_bytes): a
    corrupt element length is then bounded by the file, where reading from disk would first
    allocate whatever the length claims (a flipped byte claimed 740 MB)."""
    return pydicom.dcmread(io.BytesIO(path.read_bytes()), **options)


def _header(path: Path, limits: Limits) -> Dataset | None:
    """The header of one file (None for a DICOMDIR), checked against the caps."""
    check_file_size(path, limits)
    try:
        header = _dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise InputError(f"{path}: not a DICOM file (no DICM marker); remove it") from None
    except Exception as error:  # truncated or corrupt headers raise many types
        raise InputError(f"{path}: unreadable DICOM header ({error_text(error)})") from None
    meta = getattr(header, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
        return None
    for keyword in ("SeriesInstanceUID", "Rows", "Columns"):
        if keyword not in header:
            raise InputError(f"{path}: no {keyword} (not an image slice)")
    frames = _int(path, header, "NumberOfFrames", 1) or 1
    bits = _int(path, header, "BitsAllocated", 16) or 16
    samples = _int(path, header, "SamplesPerPixel", 1) or 1
    rows, columns = _int(path, header, "Rows", 0), _int(path, header, "Columns", 0)
    check_volume(path, rows, columns, frames, bits / 8 * samples, limits)
    if frames > 1:
        raise InputError(
            f"{path}: a multi-frame (enhanced) image of {frames} frames; give the series as "
            "classic single-frame files"
        )
    return header


def _describe(header: Dataset) -> str:
    return str(header.get("SeriesDescription", "") or header.get("ProtocolName", "") or "")


def classify(description: str, rules: SeriesRules) -> str | None:
    for sequence, pattern in rules:
        if re.search(pattern, description, re.IGNORECASE):
            return sequence
    return None


def find_series(folder: Path, rules: SeriesRules, limits: Limits) -> dict[str, DicomSeries]:
    """The sequences' series found in ``folder`` (geometry checked, pixels not yet decoded)."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    files = _files(folder)
    if len(files) > FILES_PER_SLICE_CAP * limits.max_slices:
        raise InputError(
            f"{folder}: holds {len(files)} files, more than {FILES_PER_SLICE_CAP} x "
            f"predict.limits.max_slices ({FILES_PER_SLICE_CAP * limits.max_slices}); give the "
            "patient's study folder"
        )
    for path in files:
        header = _header(path, limits)
        if header is not None:
            groups[str(header.SeriesInstanceUID)].append((path, header))
    if not groups:
        raise InputError(f"{folder}: no DICOM image files")
    chosen: dict[str, list[tuple[Path, Dataset]]] = {}
    ignored = []
    for uid, members in groups.items():
        description = _describe(members[0][1])
        sequence = classify(description, rules)
        if sequence is None:
            ignored.append(description or uid)
            continue
        if sequence in chosen:
            other = _describe(chosen[sequence][0][1])
            raise InputError(
                f"{members[0][0]}: a second {sequence} series ({description!r}; first: "
                f"{other!r} in {chosen[sequence][0][0]}); keep one, or make predict.dicom.series "
                "more specific"
            )
        chosen[sequence] = members
    if ignored:
        log.info("%s: series no predict.dicom.series rule matches, ignored: %s", folder, ignored)
    if "FLAIR" not in chosen:
        found = sorted(_describe(m[0][1]) or uid for uid, m in groups.items())
        raise InputError(f"{folder}: no FLAIR series (SeriesDescription) among {found}")
    return {s: _geometry(s, members, limits) for s, members in chosen.items()}


def _vector(path: Path, header: Dataset, keyword: str, size: int) -> np.ndarray:
    try:
        value = header.get(keyword)  # pydicom converts the text here (and may fail)
        vector = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        vector = np.zeros(0)
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise InputError(f"{path}: no valid {keyword} (needed for the slice geometry)")
    return vector


def _geometry(sequence: str, members: list[tuple[Path, Dataset]], limits: Limits) -> DicomSeries:
    first_path, first = members[0]
    rows, columns = _int(first_path, first, "Rows", 0), _int(first_path, first, "Columns", 0)
    bits = _int(first_path, first, "BitsAllocated", 16) or 16
    check_volume(first_path, rows, columns, len(members), bits / 8, limits, "its series claims")
    if len(members) < 2:
        raise InputError(f"{first_path}: the {sequence} series has a single slice")
    orientation = _vector(first_path, first, "ImageOrientationPatient", 6)
    spacing = _vector(first_path, first, "PixelSpacing", 2)
    if (spacing <= 0).any():
        raise InputError(f"{first_path}: PixelSpacing {list(spacing)} is not positive")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = []
    for path, header in members:
        if (_int(path, header, "Rows", 0), _int(path, header, "Columns", 0)) != (rows, columns):
            raise InputError(
                f"{path}: {header.Rows} x {header.Columns} pixels where the rest of its series "
                f"({first_path.name}) has {rows} x {columns}"
            )
        if not np.allclose(
            _vector(path, header, "ImageOrientationPatient", 6), orientation, atol=1e-4
        ):
            raise InputError(f"{path}: ImageOrientationPatient differs from {first_path.name}'s")
        if not np.allclose(_vector(path, header, "PixelSpacing", 2), spacing, atol=1e-4):
            raise InputError(f"{path}: PixelSpacing differs from {first_path.name}'s")
        positions.append(_vector(path, header, "ImagePositionPatient", 3))
    along = np.array([p @ normal for p in positions])
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if (steps < 1e-3).any():
        k = int(np.flatnonzero(steps < 1e-3)[0])
        raise InputError(
            f"{members[order[k + 1]][0]}: at the same slice position as {members[order[k]][0]}"
        )
    step = float(np.median(steps))
    if np.abs(steps - step).max() > POSITION_TOLERANCE * step + 1e-3:
        raise InputError(
            f"{first_path}: uneven slice spacing in its series ({steps.min():.3g} to "
            f"{steps.max():.3g} mm); a slice may be missing"
        )
    origin = positions[order[0]]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: the column index i, spacing between columns
    lps[:3, 1] = col_dir * spacing[0]  # down a column: the row index j
    lps[:3, 2] = (positions[order[-1]] - origin) / (len(members) - 1)
    lps[:3, 3] = origin
    return DicomSeries(
        sequence=sequence,
        uid=str(first.SeriesInstanceUID),
        description=_describe(first),
        files=[members[k][0] for k in order],
        headers=[members[k][1] for k in order],
        affine=np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps,
        shape=(columns, rows, len(members)),
    )


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pixels(path: Path, series: DicomSeries) -> tuple[np.ndarray, float, float]:
    """One file's pixels (rows, columns) as decoded, and its rescale slope and intercept; a
    compressed frame's own size is checked before it is decoded."""
    try:
        dataset = _dcmread(path)
        syntax = dataset.file_meta.TransferSyntaxUID
        if syntax.is_compressed and "PixelData" in dataset:
            frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
            rows, columns = series.shape[1], series.shape[0]
            samples = _int(path, dataset, "SamplesPerPixel", 1) or 1
            bits = _int(path, dataset, "BitsAllocated", 16) or 16
            check_frame(path, syntax, frame, rows, columns, samples, bits)
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{path}: unreadable DICOM file ({error_text(error)})") from None
    try:
        with _quiet("pydicom"):  # its decoders log each plugin's traceback
            pixels = dataset.pixel_array
    except Exception as error:  # no decoder for the transfer syntax, or corrupt pixel data
        raise InputError(
            f"{path}: cannot decode its pixel data (transfer syntax {syntax.name}: "
            f"{error_text(error)})"
        ) from None
    if pixels.shape != series.shape[1::-1]:
        raise InputError(f"{path}: pixel data of shape {pixels.shape}, not one gray slice")
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise InputError(f"{path}: RescaleSlope or RescaleIntercept is not finite")
    return pixels, slope, intercept


def decode(series: DicomSeries) -> Stored:
    """The series' voxels ``(columns, rows, slices)`` in their stored data type and the rescale
    that the headers give (one float32 copy of the series only when it differs per slice)."""
    raw, scales = None, []
    for k, path in enumerate(series.files):
        pixels, slope, intercept = _pixels(path, series)
        if raw is None:
            raw = np.empty(series.shape, dtype=pixels.dtype)
        elif pixels.dtype != raw.dtype:
            raise InputError(
                f"{path}: pixel data of type {pixels.dtype} where its series has {raw.dtype}"
            )
        raw[:, :, k] = pixels.T
        scales.append((slope, intercept))
    first = series.files[0]
    if len(set(scales)) == 1:
        slope, intercept = scales[0]
        return Stored(first, raw, lambda a: a.astype(np.float32) * slope + intercept)
    scaled = np.empty(series.shape, dtype=np.float32)
    for k, (slope, intercept) in enumerate(scales):
        scaled[:, :, k] = raw[:, :, k].astype(np.float32) * slope + intercept
    return Stored(first, scaled, unscaled)


def study_grid(
    folder: Path, rules: SeriesRules = DEFAULT_RULES, limits: Limits = DEFAULT_LIMITS
) -> tuple[nib.Nifti1Image, dict[str, DicomSeries]]:
    """The study's grid as a NIfTI would give it (an image with FLAIR's grid and affine, no
    voxels), and the series found, checked to share it; no pixel data are decoded."""
    series = find_series(folder, rules, limits)
    flair = series["FLAIR"]
    for sequence, other in series.items():
        same = other.shape == flair.shape and np.allclose(
            other.affine, flair.affine, atol=GRID_TOLERANCE_MM
        )
        if not same:
            how = (
                f"{other.shape} voxels, FLAIR {flair.shape}"
                if other.shape != flair.shape
                else "the same size, another position or orientation"
            )
            raise InputError(
                f"{other.files[0]}: the {sequence} series {other.description!r} is not on the "
                f"FLAIR series' grid ({how}); resample it onto the FLAIR series first"
            )
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    empty = np.broadcast_to(np.uint8(0), flair.shape)  # the grid only; no voxels are stored
    reference = nib.Nifti1Image(empty, flair.affine, header)
    reference.set_qform(flair.affine, code=1)
    reference.set_sform(flair.affine, code=1)
    return reference, series
