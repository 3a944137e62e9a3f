"""Overlap sums of stored probabilities and true masks on the inference device.

Per slice ``|P∩T|``, ``|P|`` and ``|T|`` (int64): Dice, Jaccard, the areas, the empty-mask cases
and the per-patient volume Dice are all made from them (the NumPy formulas of
brainmri.evaluation.segmentation, fed by :func:`overlap_counts_on`). Integer sums of the same
masks: the same numbers as the NumPy reference ``overlap_counts`` on any device.
"""

from __future__ import annotations

import numpy as np
import torch

from brainmri.evaluation.masks import stored_cutoff

CHUNK = 256  # slices per step: bounds the temporaries (a few bytes per pixel)


@torch.no_grad()
def overlap_counts_on(
    stored: torch.Tensor, truth: np.ndarray | torch.Tensor, threshold: float, chunk: int = CHUNK
) -> np.ndarray:
    """``(N, 3)`` int64 NumPy array: per slice ``|P∩T|, |P|, |T|`` of the masks
    ``binarize(stored, threshold)`` and ``truth`` (0/1 or boolean, on the device or on the host:
    copied a chunk at a time), summed on ``stored``'s device; one copy back to the host."""
    if stored.dtype != torch.uint8:
        raise ValueError(f"stored probabilities must be uint8, not {stored.dtype}")
    if tuple(stored.shape) != tuple(truth.shape):
        raise ValueError(f"prediction {tuple(stored.shape)} and truth {truth.shape} differ")
    cutoff = stored_cutoff(threshold)  # in 1..255, so the comparison stays within uint8
    device = stored.device
    parts = []
    for start in range(0, len(stored), chunk):
        pred = (stored[start : start + chunk] >= cutoff).flatten(1)
        true = truth[start : start + chunk]
        if isinstance(true, np.ndarray):
            true = torch.from_numpy(np.require(true, requirements="CW"))
        true = true.to(device, non_blocking=True).flatten(1) != 0
        parts.append(torch.stack([(pred & true).sum(1), pred.sum(1), true.sum(1)], dim=1))
    if not parts:
        return np.zeros((0, 3), dtype=np.int64)
    return torch.cat(parts).cpu().numpy().astype(np.int64, copy=False)
