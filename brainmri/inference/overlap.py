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
from brainmri.evaluation.segmentation import overlap_counts

CHUNK = 256  # slices per step: bounds the temporaries (a few bytes per pixel)


@torch.no_grad()
def overlap_counts_on(
    stored: torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    threshold: float,
    chunk: int = CHUNK,
    torch_sums: bool | None = None,
) -> np.ndarray:
    """``(N, 3)`` int64 NumPy array: per slice ``|P∩T|, |P|, |T|`` of the masks
    ``binarize(stored, threshold)`` and ``truth`` (0/1 or boolean, on the device or on the host:
    copied a chunk at a time), summed on ``stored``'s device; one copy back to the host.

    ``torch_sums`` (default: on accelerators only) sums with torch; on the CPU NumPy's
    reductions are several times faster than torch's over boolean arrays, so there the chunks go
    to the NumPy reference. Both give the same integers."""
    if stored.dtype != torch.uint8:
        raise ValueError(f"stored probabilities must be uint8, not {stored.dtype}")
    if tuple(stored.shape) != tuple(truth.shape):
        raise ValueError(f"prediction {tuple(stored.shape)} and truth {truth.shape} differ")
    cutoff = stored_cutoff(threshold)  # in 1..255, so the comparison stays within uint8
    if torch_sums is None:
        torch_sums = stored.device.type != "cpu"
    parts = []
    for start in range(0, len(stored), chunk):
        pred, true = stored[start : start + chunk], truth[start : start + chunk]
        if torch_sums:
            parts.append(_torch_counts(pred, true, cutoff))
        else:
            true = true.cpu().numpy() if isinstance(true, torch.Tensor) else true
            parts.append(torch.from_numpy(overlap_counts(pred.cpu().numpy() >= cutoff, true)))
    if not parts:
        return np.zeros((0, 3), dtype=np.int64)
    return torch.cat(parts).cpu().numpy().astype(np.int64, copy=False)


def _torch_counts(
    stored: torch.Tensor, truth: np.ndarray | torch.Tensor, cutoff: int
) -> torch.Tensor:
    pred = (stored >= cutoff).flatten(1)
    if isinstance(truth, np.ndarray):
        truth = torch.from_numpy(np.require(truth, requirements="CW"))
    true = truth.to(stored.device, non_blocking=True).flatten(1) != 0
    return torch.stack([(pred & true).sum(1), pred.sum(1), true.sum(1)], dim=1)
