"""Reading whole patient volumes for volume prediction: a Kaggle-layout slice folder or NIfTI.

Every reader returns a :class:`Volume`: the slices as the models see them (``(Z, H, W, 3)``
uint8, channels pre-contrast, FLAIR, post-contrast, as in the LGG TIFFs), plus what is needed to
put a mask back into the input's geometry. A missing sequence is replaced by FLAIR, as in the
training data, and reported. Every bad input raises :class:`InputError` naming the file.

NIfTI and DICOM slices are taken along the configured anatomical axis and converted one slice
at a time (:mod:`brainmri.inference.stored`: orientation, intensities, the memory bound). Every
file of a patient folder must lie in it: a symlink pointing elsewhere is refused.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation
from nibabel.volumeutils import apply_read_scaling

from brainmri.data.limits import DEFAULT as DEFAULT_LIMITS
from brainmri.data.limits import Limits, check_nifti_header, check_volume
from brainmri.data.preprocess import open_image, to_uint8_gray
from brainmri.errors import InputError, error_text
from brainmri.inference.dicom_io import (
    DEFAULT_RULES,
    SEQUENCES,
    DicomSeries,
    SeriesRules,
    decode,
    has_dicom,
    study_grid,
)
from brainmri.inference.stored import (
    Stored,
    check_slicing,
    display_slices,
    display_transform,
    equal_to_flair,
)
from brainmri.untrusted import check_inside

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
KAGGLE_SLICE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)\.tiff?$", re.IGNORECASE)
# A sequence file in a patient folder: <anything>[_-.]pre|flair|post.nii[.gz] (case-insensitive).
SEQUENCE_FILE = re.compile(r"(?:^|[_.-])(?P<seq>pre|flair|post)$", re.IGNORECASE)
SEQUENCE_KEYS = {"pre": "pre-contrast", "flair": "FLAIR", "post": "post-contrast"}
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
        name = Path(os.path.abspath(path)).name  # `.` and `..` name the folders they stand for
        niftis = sorted(
            check_inside(p, path) for p in path.iterdir() if p.is_file() and is_nifti(p)
        )
        if niftis:
            files = _sequence_files(path, niftis)
            return read_nifti_files(files, axis, name, str(path), limits)
        if not any(KAGGLE_SLICE.match(p.name) for p in path.iterdir()) and has_dicom(path):
            return read_dicom_folder(path, axis, limits, dicom, name)
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
    stack = None
    for k, number in enumerate(numbers):
        path = check_inside(numbered[number], folder)
        image = open_image(path, limits, in_plane=True)  # one slice: at most max_in_plane**2
        if stack is None:  # every slice must have the first one's size: the volume is count x that
            width, height = image.size
            check_volume(folder, height, width, len(numbers), 3, limits, "slices claim")
            stack = np.empty((len(numbers), height, width, 3), dtype=np.uint8)
        if image.mode != "RGB":
            raise InputError(
                f"{path}: expected a 3-channel RGB TIFF (pre-contrast, FLAIR, post-contrast), "
                f"got mode {image.mode}"
            )
        if image.size != (stack.shape[2], stack.shape[1]):
            raise InputError(
                f"{path}: size {image.size[0]}x{image.size[1]} differs from "
                f"{numbered[numbers[0]].name} ({stack.shape[2]}x{stack.shape[1]})"
            )
        stack[k] = np.asarray(image, dtype=np.uint8)
    masks = [
        path.with_name(f"{path.name.rsplit('.', 1)[0]}_mask.tif") for path in numbered.values()
    ]
    true_voxels = None
    if all(mask.is_file() for mask in masks):
        masks = [check_inside(mask, folder) for mask in masks]
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


# --- DICOM ------------------------------------------------------------------------------------


def read_dicom_folder(
    folder: Path,
    axis: str,
    limits: Limits = DEFAULT_LIMITS,
    rules: SeriesRules | None = None,
    name: str | None = None,
) -> Volume:
    """A folder of DICOM files (:mod:`brainmri.inference.dicom_io`), sliced and oriented exactly as
    a NIfTI with the same voxels and affine would be; one series decoded at a time."""
    reference, series = study_grid(folder, rules or DEFAULT_RULES, limits)
    readers = [(lambda one=series[s]: decode(one)) if s in series else None for s in SEQUENCES]
    missing = [s for s in SEQUENCES if s not in series]
    form = f"dicom-{3 - len(missing)}-series"
    volume = _volume(reference, readers, axis, name or folder.name, str(folder), form, missing)
    volume.dicom = series
    return volume


# --- NIfTI -------------------------------------------------------------------------------------


def open_nifti(path: Path, axis: str, limits: Limits = DEFAULT_LIMITS) -> nib.Nifti1Image:
    """The image with its header checked against ``limits`` (shape and data type, before any
    voxel is read); InputError for missing, empty or unreadable files."""
    if not path.is_file():
        raise InputError(f"{path}: not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        image = nib.load(path)  # the header only; the data stay on disk
    except Exception as error:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: not a readable NIfTI file ({error_text(error)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI image ({type(image).__name__})")
    shape = tuple(int(d) for d in image.header.get_data_shape())
    slice_axis = 2  # a 2-D image: its two axes are in-plane (and refused later)
    if len(shape) >= 3:
        try:
            slice_axis = display_transform(_affine(path, image), axis)[1]
        except InputError as error:
            raise InputError(f"{path}: {error}") from None
    check_nifti_header(path, shape, image.header.get_data_dtype().itemsize, slice_axis, limits)
    return image


def _affine(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    """The image's affine, which must be finite and invertible (it maps the mask back)."""
    affine = image.affine
    if (
        affine is None
        or not np.isfinite(affine).all()
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise InputError(f"{path}: its affine (qform/sform) is missing, singular or not finite")
    return affine


def read_stored(path: Path, image: nib.Nifti1Image) -> Stored:
    """The voxels as stored (the file's data type, no scaling applied) and nibabel's scaling."""
    proxy = image.dataobj
    try:
        raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
        slope, inter = (
            np.asanyarray(getattr(proxy, "slope", 1.0)),
            np.asanyarray(getattr(proxy, "inter", 0.0)),
        )
    except Exception as error:
        raise InputError(f"{path}: not a readable NIfTI file ({error_text(error)})") from None
    if raw.dtype.kind not in "biuf":
        raise InputError(f"{path}: voxels of type {raw.dtype}, not numbers")
    return Stored(path, raw, lambda a: apply_read_scaling(a, slope, inter).astype(np.float32))


def _shape_3d(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 2:
        raise InputError(
            f"{path}: shape {shape} where a 3-D volume (at least 2 voxels per axis) is expected"
        )
    return shape


def _volume_of(path: Path, image: nib.Nifti1Image) -> Stored:
    """One sequence's NIfTI file as stored, (X, Y, Z)."""
    stored = read_stored(path, image)
    if stored.raw.ndim == 4:
        stored.raw = stored.raw[..., 0]
    return stored


def read_nifti_files(
    files: dict[str, Path], axis: str, name: str, source: str, limits: Limits = DEFAULT_LIMITS
) -> Volume:
    """Three (or fewer) NIfTI files, one per sequence; FLAIR is required. Every header is
    checked before any voxel is read."""
    images = {s: open_nifti(path, axis, limits) for s, path in files.items()}
    flair_path = files["FLAIR"]
    shape = _shape_3d(flair_path, images["FLAIR"].shape)
    for sequence, image in images.items():  # open_nifti has checked each 3-D file's affine
        path = files[sequence]
        other = _shape_3d(path, image.shape)
        if other != shape:
            raise InputError(f"{path}: shape {other} differs from {flair_path.name} {shape}")
        if not np.allclose(image.affine, images["FLAIR"].affine, atol=AFFINE_TOLERANCE):
            raise InputError(f"{path}: affine differs from {flair_path.name}'s")
    readers = [
        (lambda s=s: _volume_of(files[s], images[s])) if s in images else None for s in SEQUENCES
    ]
    missing = [s for s in SEQUENCES if s not in images]
    form = "nifti-3-files" if not missing else f"nifti-{3 - len(missing)}-files"
    return _volume(images["FLAIR"], readers, axis, name, source, form, missing)


def read_nifti_one_file(path: Path, axis: str, limits: Limits = DEFAULT_LIMITS) -> Volume:
    """One NIfTI with the three sequences along a 4th (or 5th, NIfTI vector) dimension."""
    image = open_nifti(path, axis, limits)
    shape = tuple(int(d) for d in image.shape)
    if len(shape) == 5 and shape[3] == 1:
        shape = (*shape[:3], shape[4])
    if len(shape) < 3 or (len(shape) == 3 and min(shape) < 2):
        raise InputError(f"{path}: shape {shape} where a volume with 3 sequences is expected")
    if len(shape) != 4 or shape[3] != 3:
        raise InputError(
            f"{path}: shape {shape}; a one-file volume needs the 3 sequences (pre-contrast, "
            "FLAIR, post-contrast) along a 4th dimension of size 3; give a single sequence as "
            "<...>_flair.nii.gz in a patient folder"
        )
    _shape_3d(path, shape[:3])
    read_once = functools.cache(lambda: read_stored(path, image))  # on the first sequence

    def sequence(c: int) -> Stored:
        whole = read_once()
        raw = whole.raw[:, :, :, 0, c] if whole.raw.ndim == 5 else whole.raw[..., c]
        return Stored(path, raw, whole.scale)

    readers = [lambda c=c: sequence(c) for c in range(3)]
    return _volume(image, readers, axis, nifti_stem(path), str(path), "nifti-1-file", [])


def _volume(
    image: nib.Nifti1Image,
    readers: list,
    axis: str,
    name: str,
    source: str,
    form: str,
    missing: list[str],
) -> Volume:
    """The Volume of an image grid (NIfTI, or a DICOM study's) and its sequences' readers."""
    try:
        forward, slice_axis = display_transform(image.affine, axis)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    unit = image.header.get_xyzt_units()[0]
    to_mm = {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)  # NIfTI's default unit is mm
    spacing = tuple(z * to_mm for z in zooms)
    known = all(np.isfinite(z) and z > 0 for z in spacing)
    if known:
        check_slicing(source, image.affine, spacing, forward, axis)
    shape = tuple(int(d) for d in image.shape[:3])
    slices = display_slices(readers, shape, forward)
    missing = [s for s in SEQUENCES if s in missing or s in equal_to_flair(slices)]
    if missing:
        log.warning("%s: %s missing; FLAIR is used in its place", source, ", ".join(missing))
    return Volume(
        name=name,
        source=source,
        form=form,
        slices=slices,
        slice_numbers=list(range(shape[slice_axis])),
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
