"""Test-time augmentation: the mean of a segmenter's logits over flips of its input.

Each flip is undone on the output before averaging, so a model that is exactly flip-equivariant
(e.g. one whose output is its input) gives back exactly its plain output. ``segmentation.tta``
false (the paper) runs the model once.
"""

from __future__ import annotations

import torch
from torch import nn

# Flip axes of (B, C, H, W) tensors: none, horizontal, vertical, both.
FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


class FlipTTA(nn.Module):
    """Wrap ``model``: forward = mean over FLIPS of flip⁻¹(model(flip(x)))."""

    def __init__(self, model: nn.Module, flips: tuple[tuple[int, ...], ...] = FLIPS) -> None:
        super().__init__()
        self.model = model
        self.flips = flips

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for dims in self.flips:
            flipped = torch.flip(images, dims) if dims else images
            output = self.model(flipped)
            output = torch.flip(output, dims) if dims else output
            total = output.float() if total is None else total + output.float()
        return total / len(self.flips)


def with_tta(model: nn.Module, tta: bool) -> nn.Module:
    """``model`` itself, or wrapped in :class:`FlipTTA`."""
    return FlipTTA(model) if tta else model
