"""A volume's sequences from their stored voxels to the models' uint8 slices, one slice at a time.

Reading memory is bounded by the stored size: each sequence is held once in the data type it was
stored in (int16 for most MRI), and the only float copies are of one slice. Its intensities go to
uint8 per sequence, exactly as the training data's were: whole numbers in 0..255 stay as they
are, anything else is scaled over the whole volume, minimum to 0 and maximum to 255.

Slices are shown in the LGG TIFFs' orientation (anterior or superior up, the patient's right on
the image's left) along the requested anatomical axis, in the input's voxel order. A volume
acquired in another plane with thick slices is refused rather than resliced: its slices along
the requested axis would be stretched several times over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, ornt_transform

from brainmri.data.preprocess import _missing_modalities
from brainmri.errors import InputError

log = logging.getLogger(__name__)

# Display orientation per axis name: (row direction, column direction, slice axis letters).
AXES = {
    "axial": ("P", "L", "SI"),
    "coronal": ("I", "L", "AP"),
    "sagittal": ("I", "P", "LR"),
}
# In-plane pixels more than this much longer one way than the other: resliced from another
# plane (or so anisotropic that the models would see the anatomy squashed); refused.
MAX_STRETCH = 1.5
SQUARE_TOLERANCE = 1.2  # a warning above this


@dataclass
class Stored:
    """One sequence as stored: ``(X, Y, Z)`` voxels of the file's data type and the function
    that turns any part of them into float32 intensities (the file's scaling)."""

    path: Path | str  # named in errors
    raw: np.ndarray
    scale: Callable[[np.ndarray], np.ndarray]


def unscaled(values: np.ndarray) -> np.ndarray:
    """Values already in intensity units (no file scaling) as float32."""
    return values.astype(np.float32)


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


def check_slicing(
    source: str, affine: np.ndarray, spacing: tuple[float, ...], forward, axis: str
) -> None:
    """Refuse slices whose pixels would be stretched past :data:`MAX_STRETCH` because the
    volume's thick axis lies in their plane (a sagittal series asked for axial slices); warn
    about milder non-square pixels. ``spacing``: mm along the input's voxel axes."""
    order = np.argsort(forward[:, 0])  # input axes in display order (rows, cols, slices)
    rows, cols, through = (spacing[int(i)] for i in order)
    stretch = max(rows, cols) / min(rows, cols)
    if stretch > MAX_STRETCH and max(rows, cols) > through:
        thick = int(np.argmax(spacing))
        code = aff2axcodes(affine)[thick]
        plane = next(name for name, (*_, letters) in AXES.items() if code in letters)
        raise InputError(
            f"{source}: its voxels are {'x'.join(f'{s:g}' for s in spacing)} mm, the slices "
            f"{max(spacing):g} mm apart across the {plane} plane; {axis} slices from it would "
            f"be stretched {stretch:.1f}:1; give a volume acquired in the {axis} plane, or "
            f"--axis {plane}"
        )
    if stretch > SQUARE_TOLERANCE:
        log.warning(
            "%s: in-plane voxels of %.3g x %.3g mm are not square; the models were trained "
            "on square pixels and see the slices stretched",
            source,
            rows,
            cols,
        )


def intensity_range(stored: Stored) -> tuple[float, float, bool]:
    """Minimum, maximum and whether every value is a whole number in 0..255, one stored slice
    at a time; InputError for NaN or infinite voxels."""
    low, high, whole, bad = np.inf, -np.inf, True, 0
    for k in range(stored.raw.shape[2]):
        values = stored.scale(stored.raw[:, :, k])
        finite = np.isfinite(values)
        if not finite.all():
            bad += int((~finite).sum())
            continue
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        whole = whole and bool(np.array_equal(values, np.round(values)))
    if bad:
        raise InputError(f"{stored.path}: {bad} NaN or infinite voxel(s)")
    return low, high, whole and low >= 0 and high <= 255


def fill_channel(out: np.ndarray, channel: int, stored: Stored, forward: np.ndarray) -> None:
    """``out[..., channel]`` (``(Z, rows, cols, 3)`` uint8) from one sequence, in display
    orientation, one slice at a time."""
    low, high, whole = intensity_range(stored)
    shown = apply_orientation(stored.raw, forward)  # a view: (rows, cols, slices)
    factor = 255.0 / (high - low) if high > low else 0.0
    for z in range(shown.shape[2]):
        values = stored.scale(shown[:, :, z])
        if whole:
            out[z, :, :, channel] = values.astype(np.uint8)
        else:
            out[z, :, :, channel] = np.clip((values - low) * factor, 0, 255).round()


def display_slices(
    sequences: list[Callable[[], Stored] | None], shape: tuple[int, int, int], forward
) -> np.ndarray:
    """The ``(Z, rows, cols, 3)`` uint8 slices of three sequences (pre-contrast, FLAIR,
    post-contrast), each given as a function that reads it (None: missing, FLAIR stands in).
    Each sequence is read, converted and let go before the next is read."""
    shown = apply_orientation(np.broadcast_to(np.uint8(0), shape), forward).shape
    out = np.empty((shown[2], shown[0], shown[1], 3), dtype=np.uint8)
    for channel, read in enumerate(sequences):
        if read is not None:
            fill_channel(out, channel, read(), forward)
    for channel, read in enumerate(sequences):
        if read is None:
            out[..., channel] = out[..., 1]
    return out


def equal_to_flair(slices: np.ndarray) -> list[str]:
    """The sequences that equal FLAIR on every non-blank slice: missing, as the preprocessing of
    the training data defines it."""
    missing = _missing_modalities(
        [bool(np.array_equal(s[..., 0], s[..., 1])) for s in slices],
        [bool(np.array_equal(s[..., 2], s[..., 1])) for s in slices],
        [bool(s.max() == 0) for s in slices],
    )
    return missing.split(";") if missing else []
