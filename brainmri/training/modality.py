"""Missing-sequence robustness: train with a sequence replaced the way the data replaces it.

In the LGG data a patient's missing pre- or post-contrast sequence is a copy of FLAIR (the
manifest's ``missing_modalities``). ``segmentation.modality_dropout`` = p: each training image,
with probability p, gets its pre-contrast (channel 0), its post-contrast (channel 2) or both
(one of the three, equally likely) replaced by its FLAIR channel (1). 0 (the paper) changes
nothing and draws nothing from the generator.

2.5D input (``slice_context`` c > 0, brainmri.training.context): the channels are 3 per slice
of the window i - c .. i + c, the centre slice's at 3c .. 3c + 2. A missing sequence is missing
from the patient's whole volume, so the drawn sequences are replaced in every slice of the
window, the centre included, each by the FLAIR channel of its own slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

FLAIR = 1
REPLACEABLE = ((0,), (2,), (0, 2))  # pre-contrast, post-contrast, both


def replace_sequences(
    images: torch.Tensor, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """(B, 3 (2c + 1), H, W) images with the drawn sequences replaced by FLAIR in every slice
    of the window (a new tensor)."""
    if probability <= 0:
        return images
    batch, channels = images.shape[:2]
    if channels % 3:
        raise ValueError(f"modality dropout: {channels} channels are not 3 per slice")
    hit = torch.rand(batch, generator=generator) < probability
    which = torch.randint(len(REPLACEABLE), (batch,), generator=generator)
    out = images.clone()
    for i in torch.nonzero(hit).flatten().tolist():
        for start in range(0, channels, 3):  # each slice of the 2.5D window
            for channel in REPLACEABLE[int(which[i])]:
                out[i, start + channel] = images[i, start + FLAIR]
    return out


def with_modality_dropout(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    probability: float,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Apply :func:`replace_sequences` to each training batch of ``batches``."""
    for images, targets in batches:
        yield replace_sequences(images, probability, generator), targets
