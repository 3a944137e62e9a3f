"""Learning-rate schedules (constant, cosine, warm-up + cosine; one step per epoch) and the
score by which the training loop picks its best epoch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def selection_score(row: dict[str, Any], select_on: str) -> float:
    """Higher is better: minus the validation loss, or the named validation metric."""
    if select_on == "val_loss":
        value = -float(row["val_loss"])
    elif select_on in row:
        value = float(row[select_on])
    else:
        raise ValueError(
            f"select_on: {select_on!r} is not logged (history columns: {', '.join(row)})"
        )
    return float("-inf") if value != value else value  # NaN (nothing counted) never wins


def warmup_cosine_factor(epochs: int, warmup: int) -> Callable[[int], float]:
    """lr factor of each epoch: linear warm-up (1/(w+1), ..., w/(w+1)) over ``warmup`` epochs,
    then cosine from 1 down towards 0 over the remaining ones."""
    if not 0 <= warmup < epochs:
        raise ValueError(f"warmup_epochs: {warmup} must lie in [0, epochs={epochs})")

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: Any
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch learning-rate schedule of ``settings.lr_schedule`` (None: constant);
    ``settings`` is the loop's FitSettings (lr_schedule, epochs, warmup_epochs)."""
    if settings.lr_schedule == "constant":
        return None
    if settings.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    if settings.lr_schedule == "warmup_cosine":
        factor = warmup_cosine_factor(settings.epochs, settings.warmup_epochs)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"lr_schedule: unknown schedule {settings.lr_schedule!r}")
