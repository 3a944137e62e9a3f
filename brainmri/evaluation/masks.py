"""Stored probabilities and masks.

Probabilities travel between scripts as uint8 (probability x 255, rounded); every script turns
them into masks with :func:`binarize`, so a mask is the same wherever it is computed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.errors import InputError
from brainmri.tables import segmentation_rows


def quantize(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 (probability x 255, rounded), the stored form."""
    return np.round(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)


def binarize(stored: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 stored probabilities -> boolean masks (value / 255 >= threshold).

    The one place a segmentation threshold (``segmentation.threshold``) is applied: evaluation,
    the fold ensemble, the cascade, the overlays and ``predict`` all call it.
    """
    if stored.dtype != np.uint8:
        raise ValueError(f"stored probabilities must be uint8, not {stored.dtype}")
    return _table(threshold)[stored]


def _table(threshold: float) -> np.ndarray:
    """The mask value of each of the 256 stored values at ``threshold``."""
    if not 0 < threshold < 1:
        raise ValueError(f"segmentation threshold {threshold}: must lie strictly between 0 and 1")
    return np.arange(256) / 255.0 >= threshold


def stored_cutoff(threshold: float) -> int:
    """The smallest stored value that :func:`binarize` turns into mask at ``threshold``, so
    that ``binarize(stored, threshold) == (stored >= stored_cutoff(threshold))``: how masks
    are made on a device (brainmri.inference.overlap). In 1..255 (the threshold lies in (0, 1))."""
    return int(np.argmax(_table(threshold)))


def mean_probabilities(stored: list[np.ndarray]) -> np.ndarray:
    """The fold ensemble: mean of uint8 stored probabilities, rounded back to uint8 (exact:
    an integer sum divided once, so the result does not depend on the order of the folds)."""
    if not stored:
        raise ValueError("no probabilities to average")
    total = np.zeros(stored[0].shape, dtype=np.int32)
    for array in stored:
        if array.shape != total.shape:
            raise ValueError(f"probability arrays differ in shape: {array.shape} vs {total.shape}")
        total += array
    return np.round(total / len(stored)).astype(np.uint8)


def load_probabilities(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a ``test_probabilities.npy`` and check it is uint8 of ``shape``."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npy file ({error})") from None
    if array.dtype != np.uint8 or array.shape != tuple(shape):
        raise InputError(
            f"{path}: expected uint8 probabilities of shape {tuple(shape)} (test slices, S, S), "
            f"found {array.dtype} {array.shape}"
        )
    return array


def load_masks(path: str | Path, rows: pd.DataFrame) -> np.ndarray:
    """Boolean masks of ``rows`` (manifest rows of LGG slices) from ``data/lgg/masks.npy``."""
    try:
        masks = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npy file ({error})") from None
    if masks.ndim != 3:
        raise InputError(f"{path}: expected masks of shape (N, S, S), found {masks.shape}")
    index = rows["array_index"].to_numpy(dtype=int)
    if len(index) and (index.min() < 0 or index.max() >= len(masks)):
        raise InputError(
            f"{path}: holds {len(masks)} masks, the manifest refers to row {index.max()}"
        )
    return np.asarray(masks[index]).astype(bool)


def add_test_set_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a script that scores stored probabilities on the segmentation test set
    and writes a metrics JSON and per-slice rows."""
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--masks", required=True, type=Path, help="data/lgg/masks.npy")
    parser.add_argument("--threshold", type=float, required=True, help="segmentation threshold")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--per-slice", required=True, type=Path)


def load_test_set(args: argparse.Namespace) -> tuple[pd.DataFrame, np.ndarray]:
    """The test rows (:func:`brainmri.tables.segmentation_rows`) and their true masks."""
    rows = segmentation_rows(args.manifest, args.splits)
    return rows, load_masks(args.masks, rows)
