"""Optional 2.5D input (``segmentation.slice_context`` = c): each slice's channels followed by
those of its c neighbours on either side in its patient's slice order, (2c + 1) x 3 channels
in all, ordered from slice i - c to i + c. At a volume's ends the missing neighbours repeat the
edge slice. 0 (the paper) is the plain 2D input."""

from __future__ import annotations

import numpy as np
import pandas as pd


def input_channels(settings: dict) -> int:
    """Channels of a segmenter's input: 3 per slice of the context window."""
    return 3 * (2 * int(settings.get("slice_context", 0)) + 1)


def neighbour_index(patients: np.ndarray, slice_index: np.ndarray, context: int) -> np.ndarray:
    """(N, 2c + 1) row positions: for each row, the rows of slices i - c .. i + c of the same
    patient (by slice order, edge slices repeated)."""
    patients, slice_index = np.asarray(patients), np.asarray(slice_index)
    result = np.empty((len(patients), 2 * context + 1), dtype=np.int64)
    offsets = np.arange(-context, context + 1)
    for patient in pd.unique(patients):
        rows = np.flatnonzero(patients == patient)
        rows = rows[np.argsort(slice_index[rows], kind="stable")]
        rank = np.arange(len(rows))
        window = np.clip(rank[:, None] + offsets[None, :], 0, len(rows) - 1)
        result[rows] = rows[window]
    return result


def stack_neighbours(
    images: np.ndarray, patients: np.ndarray, slice_index: np.ndarray, context: int
) -> np.ndarray:
    """uint8 (N, S, S, 3) -> (N, S, S, 3 (2c + 1)); ``context`` 0 returns ``images`` itself."""
    if context == 0:
        return images
    if context < 0:
        raise ValueError(f"slice_context must be >= 0, not {context}")
    index = neighbour_index(patients, slice_index, context)
    return np.concatenate([images[index[:, k]] for k in range(index.shape[1])], axis=-1)


def with_context(images: np.ndarray, rows: pd.DataFrame, context: int) -> np.ndarray:
    """:func:`stack_neighbours` of ``rows`` (manifest rows aligned with ``images``)."""
    if context == 0:
        return images
    return stack_neighbours(
        images, rows["patient"].to_numpy(), rows["slice_index"].to_numpy(), context
    )
