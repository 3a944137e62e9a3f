"""Batched segmentation inference shared by evaluation, the fold ensemble and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainmri.devices import select_device
from brainmri.models import load_checkpoint
from brainmri.tables import ArrayFiles, gather
from brainmri.training.batches import Batches
from brainmri.training.loop import configure_torch, predict_logits

BATCH = 32


def probabilities_of(
    checkpoints: list[Path], images: np.ndarray, device: torch.device
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mean sigmoid probability (N, S, S) of the models on uint8 images (N, S, S, 3)."""
    size = images.shape[1]
    total = None
    checkpoint: dict[str, Any] = {}
    for path in checkpoints:
        model, checkpoint = load_checkpoint(path, device)
        batches = Batches(images, np.zeros(len(images)), BATCH, device, checkpoint["input_size"])
        logits = predict_logits(model, batches.epoch(), device)
        if logits.shape[-1] != size:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear")
        probabilities = torch.sigmoid(logits[:, 0]).numpy()
        total = probabilities if total is None else total + probabilities
    return total / len(checkpoints), checkpoint


def predict_probabilities(
    checkpoints: list[Path], rows: pd.DataFrame, images: ArrayFiles, masks: ArrayFiles, threads: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Probabilities of ``rows`` (LGG slices), their masks, and the (last) checkpoint dict."""
    device = select_device()
    configure_torch(device, threads)
    pictures = gather(images, rows)
    truth = gather(masks, rows).astype(bool)
    probabilities, checkpoint = probabilities_of(checkpoints, pictures, device)
    return probabilities, truth, checkpoint
