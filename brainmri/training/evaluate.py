"""Inference of the training stage: validation loss and metric, test logits, mixed precision.

Sums are kept as float64 tensors on the device and read once per pass (no synchronisation per
batch on a GPU); on the CPU the numbers are the same as adding Python floats batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from brainmri.errors import InputError

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Preempted(RuntimeError):
    """SIGTERM arrived; the job stops (exit 143) and resumes from its last epoch next time."""


def autocast(device: torch.device):
    """bf16 autocast on CUDA where supported (else fp16), nothing on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class MetricSums:
    """Running sums (on the device: no sync per batch) of per-sample metrics: one tensor, or a
    dict of them by name with NaN where a sample does not count."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, values: torch.Tensor | dict[str, torch.Tensor]) -> None:
        named = values if isinstance(values, dict) else {self.name: values}
        for key, value in named.items():
            value = value.detach().double()
            counted = ~torch.isnan(value)
            total = torch.where(counted, value, torch.zeros_like(value)).sum()
            self.sums[key] = self.sums.get(key, 0) + total
            self.counts[key] = self.counts.get(key, 0) + counted.sum()

    def means(self) -> dict[str, float]:
        """Mean of each metric over the samples that count (NaN where none did)."""
        return {
            key: float(self.sums[key]) / float(self.counts[key])
            if float(self.counts[key])
            else float("nan")
            for key in self.sums
        }


@torch.no_grad()
def evaluate_all(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metric_fn: MetricFn,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    stop: Callable[[], bool] | None = None,
    name: str = "metric",
) -> tuple[float, dict[str, float]]:
    """Mean loss (weighted by batch size) and the mean of each metric over ``batches``.

    ``model`` may be a compiled forward of the module (it is put in eval mode by the caller
    then). ``stop`` (checked before each batch) returning true raises :class:`Preempted`.
    """
    if isinstance(model, nn.Module):
        model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    metrics = MetricSums(name)
    count = 0
    for images, targets in batches:
        if stop is not None and stop():
            raise Preempted("stopped by SIGTERM during validation")
        with autocast(device):
            logits = model(images)
        logits = logits.float()
        n = images.shape[0]
        total_loss += loss_fn(logits, targets).double() * n
        metrics.add(metric_fn(logits, targets))
        count += n
    if not count:
        raise InputError("the validation split is empty")
    return float(total_loss) / count, metrics.means()


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, Any]], device: torch.device
) -> torch.Tensor:
    """Concatenated float logits (on the CPU) of ``model`` over ``batches``."""
    model.eval()
    outputs = []
    for images, _ in batches:
        with autocast(device):
            outputs.append(model(images).float())
    return torch.cat(outputs).cpu()


def accuracy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == labels).float()


def dice_per_sample(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-slice Dice at threshold 0.5; 1 where prediction and truth are both empty."""
    pred = (logits > 0).float().flatten(1)
    truth = masks.flatten(1)
    intersection = (pred * truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))


def segmentation_metrics(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-slice Dice on all slices and on tumor slices only (NaN on slices without tumor)."""
    dice = dice_per_sample(logits, masks)
    tumor = masks.flatten(1).sum(1) > 0
    return {
        "dice_all_slices": dice,
        "dice_tumor_slices": torch.where(tumor, dice, torch.full_like(dice, float("nan"))),
    }
