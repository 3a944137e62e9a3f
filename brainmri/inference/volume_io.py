"""Reading whole patient volumes for volume prediction: a Kaggle-layout slice folder or NIfTI.

Every reader returns a :class:`Volume`: the slices as the models see them (``(Z, H, W, 3)``
uint8, channels pre-contrast, FLAIR, post-contrast, as in the LGG TIFFs), plus what is needed to
put a mask back into the input's geometry. A missing sequence is replaced by FLAIR, as in the
training data, and reported. Every bad input raises :class:`InputError` naming the file.

NIfTI slices are taken along the configured anatomical axis and shown in the LGG TIFFs'
orientation (anterior or superior up, the patient's right on the image's left); the slice order
is the input's voxel order along that axis. Intensities that are not already uint8 are scaled
per sequence over the whole volume, minimum to 0 and maximum to 255 (each sequence is then
comparable between slices, as in the TIFFs).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, ornt_transform

from brainmri.data.limits import DEFAULT as DEFAULT_LIMITS
from brainmri.data.limits import Limits, check_nifti_header, check_volume
from brainmri.data.preprocess import _missing_modalities, open_image, to_uint8_gray
from brainmri.errors import InputError
from brainmri.inference.dicom_io import (
    DEFAULT_RULES,
    SEQUENCES,
    DicomSeries,
    SeriesRules,
    has_dicom,
    read_study,
)

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
KAGGLE_SLICE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)\.tiff?$", re.IGNORECASE)
# A sequence file in a patient folder: <anything>[_-.]pre|flair|post.nii[.gz] (case-insensitive).
SEQUENCE_FILE = re.compile(r"(?:^|[_.-])(?P<seq>pre|flair|post)$", re.IGNORECASE)
SEQUENCE_KEYS = {"pre": "pre-contrast", "flair": "FLAIR", "post": "post-contrast"}
# Display orientation per axis name: (row direction, column direction, slice axis letters).
AXES = {
    "axial": ("P", "L", "SI"),
    "coronal": ("I", "L", "AP"),
    "sagittal": ("I", "P", "LR"),
}
AFFINE_TOLERANCE = 1e-3


@dataclass
class Volume:
    """One patient's slices, ready for the models, and how to map a mask back."""

    name: str
    source: str  # the input as given
    form: str  # kaggle-folder | nifti-3-files | nifti-1-file
    slices: np.ndarray  # (Z, H, W, 3) uint8, display orientation
    slice_numbers: list[int]  # per slice: Kaggle <n>, or the voxel index along the slice axis
    missing: list[str] = field(default_factory=list)
    voxel_ml: float | None = None  # volume of one voxel in mL where the spacing is known
    spacing_mm: tuple[float, ...] | None = None
    reference: nib.Nifti1Image | None = None  # NIfTI: the input whose geometry masks take
    to_input: np.ndarray | None = None  # NIfTI: orientation transform display -> input voxels
    slice_files: list[Path] = field(default_factory=list)  # folder: the TIFF of each slice
    true_voxels: int | None = None  # folder: tumor pixels of its _mask.tif files, when all exist
    dicom: dict[str, DicomSeries] = field(default_factory=dict)  # DICOM: the source series


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_input(
    path: Path, axis: str, limits: Limits = DEFAULT_LIMITS, dicom: SeriesRules | None = None
) -> Volume:
    """A patient given as one path: a slice folder, a folder of sequence NIfTIs, a folder of
    DICOM files (any nesting), or a 4-D NIfTI. ``limits``: the size caps, checked on headers."""
    if path.is_dir():
        niftis = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
        if niftis:
            files = _sequence_files(path, niftis)
            return read_nifti_files(files, axis, path.name, str(path), limits)
        if not any(KAGGLE_SLICE.match(p.name) for p in path.iterdir()) and has_dicom(path):
            return read_dicom_folder(path, axis, limits, dicom)
        return read_kaggle_folder(path, limits)
    if not path.exists():
        raise InputError(f"{path}: not found")
    if is_nifti(path):
        return read_nifti_one_file(path, axis, limits)
    raise InputError(
        f"{path}: expected a patient folder (<patient>_<n>.tif slices or sequence NIfTI files) "
        "or a .nii/.nii.gz file"
    )


def _sequence_files(folder: Path, niftis: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in niftis:
        match = SEQUENCE_FILE.search(nifti_stem(path))
        if not match:
            raise InputError(
                f"{path}: cannot tell the sequence; name the files <...>_pre, <...>_flair and "
                "<...>_post (.nii or .nii.gz)"
            )
        sequence = SEQUENCE_KEYS[match["seq"].lower()]
        if sequence in found:
            raise InputError(f"{path}: a second {sequence} file (first: {found[sequence].name})")
        found[sequence] = path
    if "FLAIR" not in found:
        raise InputError(f"{folder}: no FLAIR file (<...>_flair.nii.gz) among the NIfTI files")
    return found


# --- Kaggle slice folder -----------------------------------------------------------------------


def read_kaggle_folder(folder: Path, limits: Limits = DEFAULT_LIMITS) -> Volume:
    """``<patient>_<n>.tif`` RGB slices, ordered by ``n``; the ``_mask.tif`` files, when every
    slice has one, give the true tumor volume for comparison."""
    numbered: dict[int, Path] = {}
    patients = set()
    for path in folder.iterdir():
        match = KAGGLE_SLICE.match(path.name)
        if not path.is_file() or not match or match["patient"].lower().endswith("_mask"):
            continue
        number = int(match["n"])
        if number in numbered:
            raise InputError(f"{path}: slice {number} given twice (also {numbered[number].name})")
        numbered[number] = path
        patients.add(match["patient"])
    if not numbered:
        raise InputError(
            f"{folder}: no slices; expected <patient>_<n>.tif, sequence NIfTI or DICOM files"
        )
    if len(patients) > 1:
        raise InputError(f"{folder}: slices of several patients ({', '.join(sorted(patients))})")
    numbers = sorted(numbered)
    check_volume(folder, 1, 1, len(numbers), 0, limits, "holds")  # before any slice is read
    if len(numbers) < 2:
        raise InputError(f"{numbered[numbers[0]]}: a single slice where a volume is expected")
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if gaps:
        log.warning("%s: slice numbers %s are missing", folder, gaps[:10])
    slices = []
    for number in numbers:
        path = numbered[number]
        image = open_image(path, limits, in_plane=True)  # one slice: at most max_in_plane**2
        if not slices:  # every slice must have the first one's size: the volume is count x that
            width, height = image.size
            check_volume(folder, height, width, len(numbers), 3, limits, "slices claim")
        if image.mode != "RGB":
            raise InputError(
                f"{path}: expected a 3-channel RGB TIFF (pre-contrast, FLAIR, post-contrast), "
                f"got mode {image.mode}"
            )
        array = np.asarray(image, dtype=np.uint8)
        if slices and array.shape != slices[0].shape:
            raise InputError(
                f"{path}: size {array.shape[1]}x{array.shape[0]} differs from "
                f"{numbered[numbers[0]].name} ({slices[0].shape[1]}x{slices[0].shape[0]})"
            )
        slices.append(array)
    stack = np.stack(slices)
    masks = [
        path.with_name(f"{path.name.rsplit('.', 1)[0]}_mask.tif") for path in numbered.values()
    ]
    true_voxels = None
    if all(mask.is_file() for mask in masks):
        true_voxels = sum(int((to_uint8_gray(open_image(mask)) > 127).sum()) for mask in masks)
    return Volume(
        name=next(iter(patients)),
        source=str(folder),
        form="kaggle-folder",
        slices=stack,
        slice_numbers=numbers,
        missing=equal_to_flair(stack),
        slice_files=[numbered[n] for n in numbers],
        true_voxels=true_voxels,
    )


def equal_to_flair(slices: np.ndarray) -> list[str]:
    """The sequences that equal FLAIR on every non-blank slice: missing, as the preprocessing of
    the training data defines it."""
    missing = _missing_modalities(
        [bool(np.array_equal(s[..., 0], s[..., 1])) for s in slices],
        [bool(np.array_equal(s[..., 2], s[..., 1])) for s in slices],
        [bool(s.max() == 0) for s in slices],
    )
    return missing.split(";") if missing else []


# --- DICOM ------------------------------------------------------------------------------------


def read_dicom_folder(
    folder: Path, axis: str, limits: Limits = DEFAULT_LIMITS, rules: SeriesRules | None = None
) -> Volume:
    """A folder of DICOM files (:mod:`brainmri.inference.dicom_io`), sliced and oriented exactly as
    a NIfTI with the same voxels and affine would be."""
    reference, stacked, missing, series = read_study(folder, rules or DEFAULT_RULES, limits)
    form = f"dicom-{3 - len(missing)}-series"
    volume = _from_nifti(reference, stacked, axis, folder.name, str(folder), form, missing)
    volume.dicom = series
    return volume


# --- NIfTI -------------------------------------------------------------------------------------


def load_nifti(
    path: Path, axis: str, limits: Limits = DEFAULT_LIMITS
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The image and its voxels as float; InputError for unreadable, empty or NaN files, and for
    headers whose shape and data type pass ``limits`` (checked before the data are read)."""
    if not path.is_file():
        raise InputError(f"{path}: not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        image = nib.load(path)  # the header only; the data stay on disk
    except Exception as error:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: not a readable NIfTI file ({_first_line(error)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI image ({type(image).__name__})")
    shape = tuple(int(d) for d in image.header.get_data_shape())
    slice_axis = 2  # a 2-D image: its two axes are in-plane (and refused later)
    if len(shape) >= 3:
        try:
            slice_axis = display_transform(image.affine, axis)[1]
        except InputError as error:
            raise InputError(f"{path}: {error}") from None
    check_nifti_header(path, shape, image.header.get_data_dtype().itemsize, slice_axis, limits)
    try:
        data = np.asanyarray(image.dataobj).astype(np.float32)
    except Exception as error:
        raise InputError(f"{path}: not a readable NIfTI file ({_first_line(error)})") from None
    if data.size == 0:
        raise InputError(f"{path}: empty image (shape {data.shape})")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise InputError(f"{path}: {bad} NaN or infinite voxel(s)")
    return image, data


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _check_3d(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim < 3 or min(data.shape[:3]) < 2 or data.ndim > 3:
        raise InputError(
            f"{path}: shape {data.shape} where a 3-D volume (at least 2 voxels per axis) is "
            "expected"
        )
    return data


def read_nifti_files(
    files: dict[str, Path], axis: str, name: str, source: str, limits: Limits = DEFAULT_LIMITS
) -> Volume:
    """Three (or fewer) NIfTI files, one per sequence; FLAIR is required."""
    flair_image, flair = load_nifti(files["FLAIR"], axis, limits)
    flair = _check_3d(files["FLAIR"], flair)
    channels = {"FLAIR": flair}
    for sequence in ("pre-contrast", "post-contrast"):
        if sequence not in files:
            continue
        path = files[sequence]
        image, data = load_nifti(path, axis, limits)
        data = _check_3d(path, data)
        if data.shape != flair.shape:
            raise InputError(
                f"{path}: shape {data.shape} differs from {files['FLAIR'].name} {flair.shape}"
            )
        if not np.allclose(image.affine, flair_image.affine, atol=AFFINE_TOLERANCE):
            raise InputError(f"{path}: affine differs from {files['FLAIR'].name}'s")
        channels[sequence] = data
    missing = [s for s in SEQUENCES if s not in channels]
    stacked = np.stack([channels.get(s, flair) for s in SEQUENCES], axis=-1)
    form = "nifti-3-files" if not missing else f"nifti-{3 - len(missing)}-files"
    return _from_nifti(flair_image, stacked, axis, name, source, form, missing)


def read_nifti_one_file(path: Path, axis: str, limits: Limits = DEFAULT_LIMITS) -> Volume:
    """One NIfTI with the three sequences along a 4th (or 5th, NIfTI vector) dimension."""
    image, data = load_nifti(path, axis, limits)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim < 3 or (data.ndim == 3 and min(data.shape) < 2):
        raise InputError(f"{path}: shape {data.shape} where a volume with 3 sequences is expected")
    if data.ndim != 4 or data.shape[3] != 3:
        raise InputError(
            f"{path}: shape {data.shape}; a one-file volume needs the 3 sequences (pre-contrast, "
            "FLAIR, post-contrast) along a 4th dimension of size 3; give a single sequence as "
            "<...>_flair.nii.gz in a patient folder"
        )
    _check_3d(path, data[..., 1])
    return _from_nifti(image, data, axis, nifti_stem(path), str(path), "nifti-1-file", [])


def to_uint8(data: np.ndarray) -> np.ndarray:
    """Per sequence (last axis): unchanged if already whole numbers in 0..255, else min-max."""
    out = np.empty(data.shape, dtype=np.uint8)
    for c in range(data.shape[-1]):
        channel = data[..., c]
        low, high = float(channel.min()), float(channel.max())
        if low >= 0 and high <= 255 and np.array_equal(channel, np.round(channel)):
            out[..., c] = channel.astype(np.uint8)
            continue
        scale = 255.0 / (high - low) if high > low else 0.0
        out[..., c] = np.clip((channel - low) * scale, 0, 255).round().astype(np.uint8)
    return out


def display_transform(affine: np.ndarray, axis: str) -> tuple[np.ndarray, int]:
    """Orientation transform input voxels -> (rows, cols, slices), and the input slice axis."""
    codes = aff2axcodes(affine)
    rows, cols, letters = AXES[axis]
    slice_axes = [i for i, code in enumerate(codes) if code in letters]
    if len(slice_axes) != 1:
        raise InputError(f"affine {codes} has no single {axis} axis")
    slice_axis = slice_axes[0]
    target = (rows, cols, codes[slice_axis])  # keep the input's slice order
    return ornt_transform(axcodes2ornt(codes), axcodes2ornt(target)), slice_axis


def _from_nifti(
    image: nib.Nifti1Image,
    data: np.ndarray,
    axis: str,
    name: str,
    source: str,
    form: str,
    missing: list[str],
) -> Volume:
    try:
        forward, slice_axis = display_transform(image.affine, axis)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    shown = apply_orientation(to_uint8(data), forward)  # (rows, cols, slices, 3)
    slices = np.ascontiguousarray(np.moveaxis(shown, 2, 0))
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    unit = image.header.get_xyzt_units()[0]
    to_mm = {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)  # NIfTI's default unit is mm
    spacing = tuple(z * to_mm for z in zooms)
    known = all(z > 0 for z in spacing)
    missing = [s for s in SEQUENCES if s in missing or s in equal_to_flair(slices)]
    if missing:
        log.warning("%s: %s missing; FLAIR is used in its place", source, ", ".join(missing))
    if known:
        rows, cols = (spacing[int(i)] for i in np.argsort(forward[:, 0])[:2])
        if max(rows, cols) > 1.2 * min(rows, cols):
            log.warning(
                "%s: in-plane voxels of %.3g x %.3g mm are not square; the models were trained "
                "on square pixels and see the slices stretched",
                source,
                rows,
                cols,
            )
    return Volume(
        name=name,
        source=source,
        form=form,
        slices=slices,
        slice_numbers=list(range(data.shape[slice_axis])),
        missing=missing,
        voxel_ml=float(np.prod(spacing)) / 1000.0 if known else None,
        spacing_mm=spacing if known else None,
        reference=image,
        to_input=_inverse(forward),
    )


def _inverse(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``transform``."""
    inverse = np.zeros_like(transform)
    for source_axis, (target_axis, flip) in enumerate(transform):
        inverse[int(target_axis)] = (source_axis, flip)
    return inverse


def mask_to_input(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """A (Z, H, W) display-orientation mask as an array in the NIfTI input's voxel order."""
    return apply_orientation(np.moveaxis(mask, 0, 2), volume.to_input)
