"""Inference of the training stage: validation loss and metric, test logits, mixed precision.

Sums are kept as float64 tensors on the device and read once per pass (no synchronisation per
batch on a GPU); on the CPU the numbers are the same as adding Python floats batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from brainmri.accelerator import AcceleratorPlan, default_plan
from brainmri.errors import InputError

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Preempted(RuntimeError):
    """SIGTERM arrived; the job stops (exit 143) and resumes from its last epoch next time."""


def autocast(plan: AcceleratorPlan | torch.device) -> AbstractContextManager:
    """The plan's autocast (a device: its default plan's)."""
    if isinstance(plan, torch.device):
        plan = default_plan(plan)
    return plan.autocast()


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
    plan: AcceleratorPlan | None = None,
) -> tuple[float, dict[str, float]]:
    """The loss over the whole of ``batches`` and the mean of each metric per sample.

    A loss with ``sums``/``from_sums`` (the segmentation losses, brainmri.training.losses) is
    computed from its sums over every batch, as one batch of the whole set: the same whatever
    the evaluation batch size. Any other loss (cross-entropy: a mean per sample) is the mean of
    the batch losses weighted by batch size. ``model`` may be a compiled forward of the module
    (it is put in eval mode by the caller then). ``stop`` (checked before each batch) returning
    true raises :class:`Preempted`.
    """
    if isinstance(model, nn.Module):
        model.eval()
    plan = plan or default_plan(device)
    summed = hasattr(loss_fn, "sums")
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    metrics = MetricSums(name)
    count = 0
    for images, targets in batches:
        if stop is not None and stop():
            raise Preempted("stopped by SIGTERM during validation")
        with plan.autocast():
            logits = model(images)
        logits = logits.float()
        n = images.shape[0]
        if summed:
            total_loss = total_loss + loss_fn.sums(logits, targets)
        else:
            total_loss += loss_fn(logits, targets).double() * n
        metrics.add(metric_fn(logits, targets))
        count += n
    if not count:
        raise InputError("the validation split is empty")
    loss = float(loss_fn.from_sums(total_loss)) if summed else float(total_loss) / count
    return loss, metrics.means()


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, Any]],
    device: torch.device,
    plan: AcceleratorPlan | None = None,
) -> torch.Tensor:
    """Concatenated float logits (on the CPU) of ``model`` over ``batches``."""
    model.eval()
    plan = plan or default_plan(device)
    outputs = []
    for images, _ in batches:
        with plan.autocast():
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
