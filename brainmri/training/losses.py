"""Segmentation losses and the checkpoint-selection criterion, chosen by config keys.

``segmentation.loss``: ``dice`` (the paper: soft Dice on the batch) or ``dice_bce`` (soft Dice
plus per-pixel binary cross-entropy, which keeps a gradient on small tumors that the batch Dice
averages away). ``segmentation.select_on``: ``val_loss`` (the paper: lowest validation loss) or
``tumor_dice`` (highest mean Dice over the validation slices that hold tumor, so that a model
predicting little cannot look good on the many empty slices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LOSSES = ("dice", "dice_bce")
SELECT_ON = {"val_loss": "val_loss", "tumor_dice": "val_dice_tumor_slices"}


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SegmentationLoss:
    """A segmentation loss on logits (B, 1, H, W) and 0/1 masks: the batch loss of training
    (``__call__``), and for validation its per-batch sums (``sums``) whose total
    ``from_sums`` turns into the loss of the whole set as one batch, so that the validation
    loss does not depend on the evaluation batch size."""

    def __init__(self, name: str, smooth: float) -> None:
        import segmentation_models_pytorch as smp

        if name not in LOSSES:
            raise ValueError(
                f"segmentation.loss: unknown loss {name!r} (one of {', '.join(LOSSES)})"
            )
        self.name, self.smooth = name, smooth
        self.dice = smp.losses.DiceLoss("binary", from_logits=True, smooth=smooth)
        self.eps = self.dice.eps

    def __call__(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        loss = self.dice(logits, masks)
        if self.name == "dice_bce":
            loss = loss + F.binary_cross_entropy_with_logits(logits, masks)
        return loss

    def sums(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """float64 (5,): sum p t, sum p + t, sum t, summed BCE, pixels (p = sigmoid(logits))."""
        probabilities = F.logsigmoid(logits).exp().double()
        truth = masks.double()
        bce = (
            F.binary_cross_entropy_with_logits(logits.double(), truth, reduction="sum")
            if self.name == "dice_bce"
            else truth.new_zeros(())
        )
        return torch.stack(
            [
                (probabilities * truth).sum(),
                (probabilities + truth).sum(),
                truth.sum(),
                bce,
                truth.new_tensor(float(truth.numel())),
            ]
        )

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """The loss of the set whose :meth:`sums` were added up (as smp's DiceLoss on one
        batch: 0 where the set holds no tumor pixel)."""
        intersection, cardinality, truth, bce, pixels = sums.unbind()
        # smp's soft Dice (a Tversky score with alpha = beta = 0.5): (I + s) / ((P + T) / 2 + s)
        dice = (intersection + self.smooth) / (cardinality / 2 + self.smooth).clamp_min(self.eps)
        loss = (1 - dice) * (truth > 0)
        if self.name == "dice_bce":
            loss = loss + bce / pixels
        return loss


def segmentation_loss(settings: dict[str, Any]) -> SegmentationLoss:
    """The loss of ``settings["loss"]`` (default dice) on logits (B, 1, H, W) and 0/1 masks."""
    return SegmentationLoss(settings.get("loss", "dice"), settings["dice_smooth"])


def selection_column(settings: dict[str, Any]) -> str:
    """The history column the checkpoint (and early stopping) follows."""
    name = settings.get("select_on", "val_loss")
    if name not in SELECT_ON:
        raise ValueError(f"segmentation.select_on: unknown criterion {name!r}")
    return SELECT_ON[name]
