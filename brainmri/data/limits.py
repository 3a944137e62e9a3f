"""Input size limits, checked from a file's header before anything large is decoded.

A 5 MB ``.nii.gz`` of zeros can claim 4000 x 4000 x 300 voxels, a DICOM header any number of
rows, columns and frames, a PNG a billion pixels: decoding them first would exhaust the machine.
Every reader of new data (volume prediction's NIfTI, DICOM and slice-folder readers, and the
images of ``predict``) asks this module first, with the sizes the header claims, and refuses in
one line naming the file, the size it claims and the cap (``predict.limits`` in the config).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from brainmri.errors import InputError


@dataclass(frozen=True)
class Limits:
    """The caps (config ``predict.limits``); the defaults fit any real brain MRI."""

    max_in_plane: int = 1024  # rows and columns of a volume's slice
    max_slices: int = 1000  # slices of a volume (NIfTI slice axis, DICOM series, slice folder)
    max_bytes: int = 1 << 30  # one volume (or series) as stored, before any conversion
    max_image_pixels: int = 4096 * 4096  # one 2-D image (predict, slice-folder TIFFs)

    @classmethod
    def from_json(cls, text: str) -> Limits:
        """``--limits``: a JSON object with some of the fields (the rest keep their defaults)."""
        try:
            settings = json.loads(text)
        except ValueError as error:
            raise ValueError(f"not JSON ({error}): {text}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"expected a JSON object, not {text}")
        unknown = sorted(set(settings) - set(asdict(cls())))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} in {text}")
        for key, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1: {text}")
        return cls(**settings)


DEFAULT = Limits()

# Volume prediction's peak memory, measured (docs/volumes.md#memory): PyTorch and the models, then
# per voxel of one sequence: the uint8 slices (3 bytes), the mask and the two maps at the input's
# size, and writing them (9 bytes in all); reading holds one file as stored and, for .nii.gz,
# a second copy of its bytes while it is unpacked.
MODELS_MB = 2000
BYTES_PER_VOXEL = 9


def volume_memory_mb(limits: Limits = DEFAULT) -> int:
    """Peak memory (MB) of predicting one volume at the caps: the largest volume they let in
    (at 1 byte a voxel) read, predicted and written. The rule's ``mem_mb``."""
    voxels = min(limits.max_in_plane**2 * limits.max_slices, limits.max_bytes)
    return MODELS_MB + math.ceil((2 * limits.max_bytes + BYTES_PER_VOXEL * voxels) / 1e6)


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def check_volume(
    path: Path | str,
    rows: int,
    columns: int,
    slices: int,
    bytes_per_voxel: float,
    limits: Limits = DEFAULT,
    what: str = "header claims",
) -> None:
    """Refuse a volume whose claimed size passes a cap (before it is decoded)."""
    if rows > limits.max_in_plane or columns > limits.max_in_plane:
        raise InputError(
            f"{path}: {what} slices of {rows} x {columns} voxels, more than the cap of "
            f"{limits.max_in_plane} per in-plane axis (predict.limits.max_in_plane)"
        )
    if slices > limits.max_slices:
        raise InputError(
            f"{path}: {what} {slices} slices, more than the cap of {limits.max_slices} "
            "(predict.limits.max_slices)"
        )
    total = math.ceil(rows * columns * slices * bytes_per_voxel)
    if total > limits.max_bytes:
        raise InputError(
            f"{path}: {what} {rows} x {columns} x {slices} voxels ({_size(total)} decoded), more "
            f"than the cap of {_size(limits.max_bytes)} (predict.limits.max_bytes)"
        )


def check_file_size(path: Path, limits: Limits = DEFAULT) -> None:
    """Refuse a file larger on disk than a whole volume may be."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise InputError(
            f"{path}: {_size(size)} on disk, more than the cap of {_size(limits.max_bytes)} "
            "(predict.limits.max_bytes)"
        )


def check_image(path: Path | str, width: int, height: int, limits: Limits = DEFAULT) -> None:
    """Refuse a 2-D image whose header claims more pixels than the cap (decompression bombs),
    counted as the centred square every image is padded to before it is resized: a 17728 x 64
    strip passes a cap on width x height but pads to 314 M pixels."""
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"{path}: header claims {width} x {height} pixels, more than the cap of "
            f"{limits.max_image_pixels} pixels (predict.limits.max_image_pixels)"
        )
    side = max(width, height)
    if side * side > limits.max_image_pixels:
        raise InputError(
            f"{path}: header claims {width} x {height} pixels, padded to a {side} x {side} "
            f"square: more than the cap of {limits.max_image_pixels} pixels "
            "(predict.limits.max_image_pixels)"
        )


def check_nifti_header(
    path: Path, shape: tuple[int, ...], itemsize: int, slice_axis: int, limits: Limits = DEFAULT
) -> None:
    """A NIfTI header's shape (any number of dimensions) and data type against the caps;
    ``slice_axis`` is the spatial axis the volume is sliced along."""
    spatial = [int(d) for d in shape[:3]] + [1] * (3 - len(shape[:3]))
    extra = math.prod(int(d) for d in shape[3:])  # sequences (4-D), vector components (5-D)
    rows, columns = (spatial[a] for a in range(3) if a != slice_axis)
    check_volume(path, rows, columns, spatial[slice_axis], itemsize * extra, limits)
