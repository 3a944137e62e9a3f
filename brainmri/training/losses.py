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


def segmentation_loss(settings: dict[str, Any]) -> LossFn:
    """The loss of ``settings["loss"]`` (default dice) on logits (B, 1, H, W) and 0/1 masks."""
    import segmentation_models_pytorch as smp

    name = settings.get("loss", "dice")
    dice = smp.losses.DiceLoss("binary", from_logits=True, smooth=settings["dice_smooth"])
    if name == "dice":
        return dice
    if name == "dice_bce":

        def dice_bce(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            return dice(logits, masks) + F.binary_cross_entropy_with_logits(logits, masks)

        return dice_bce
    raise ValueError(f"segmentation.loss: unknown loss {name!r} (one of {', '.join(LOSSES)})")


def selection_column(settings: dict[str, Any]) -> str:
    """The history column the checkpoint (and early stopping) follows."""
    name = settings.get("select_on", "val_loss")
    if name not in SELECT_ON:
        raise ValueError(f"segmentation.select_on: unknown criterion {name!r}")
    return SELECT_ON[name]
