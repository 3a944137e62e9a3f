"""Batched inference shared by evaluation, the fold ensemble and predict.

Large batches (the checkpoint's ``eval_batch_size``, else sized for the device), bf16 autocast
and channels_last on CUDA as in training, the images resident on the GPU when they fit, and the
sigmoid/resize done on the device per batch: no per-slice Python work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainmri.devices import select_device
from brainmri.errors import InputError
from brainmri.inference.tta import with_tta
from brainmri.models import load_checkpoint
from brainmri.tables import ArrayFiles, gather
from brainmri.training.batches import Batches, make_resident
from brainmri.training.context import with_context
from brainmri.training.evaluate import autocast
from brainmri.training.loop import configure_torch
from brainmri.training.setup import CPU_INFERENCE_BATCH, eval_batch_size

RESIDENT_SHARE = 0.5  # of the free GPU memory, for inference inputs


def load_for_inference(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A checkpoint's model in eval mode on ``device`` (channels_last on CUDA)."""
    model, checkpoint = load_checkpoint(path, device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model, checkpoint


def place(images: np.ndarray, device: torch.device) -> tuple[Any, Any]:
    """Images (and dummy targets) for :func:`inference_batches`: on the GPU when they fit."""
    if device.type != "cuda":
        return images, np.zeros(len(images))
    placed = make_resident([images], device, RESIDENT_SHARE, "inference images")[0]
    dummy = torch.zeros(len(images), device=device) if isinstance(placed, torch.Tensor) else None
    return placed, dummy if dummy is not None else np.zeros(len(images))


def inference_batches(placed: tuple[Any, Any], checkpoint: dict, device: torch.device) -> Batches:
    batch = eval_batch_size(checkpoint["settings"], device, CPU_INFERENCE_BATCH)
    images, targets = placed
    size = checkpoint["input_size"]
    return Batches(images, targets, batch, device, size, None, device.type == "cuda")


@torch.no_grad()
def probabilities_of(
    checkpoints: list[Path],
    images: np.ndarray,
    device: torch.device,
    tta: bool = False,
    rows: pd.DataFrame | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mean sigmoid probability (N, S, S) of the models on uint8 images (N, S, S, 3); with
    ``tta`` each model's logits are the mean over flips (brainmri.inference.tta). ``rows``
    (manifest rows of the images: patient, slice_index) feed 2.5D models their neighbours."""
    size = images.shape[1]
    placed = place(images, device)
    total = None
    checkpoint: dict[str, Any] = {}
    for path in checkpoints:
        model, checkpoint = load_for_inference(path, device)
        model = with_tta(model, tta)
        inputs = placed
        context = checkpoint["settings"].get("slice_context", 0)
        if context:
            if rows is None:
                raise InputError(
                    f"{path}: a 2.5D model (slice_context {context}) needs each slice's "
                    "neighbours; it cannot predict single images"
                )
            inputs = place(with_context(images, rows, context), device)
        parts = []
        for batch, _ in inference_batches(inputs, checkpoint, device).epoch():
            with autocast(device):
                logits = model(batch)
            logits = logits.float()
            if logits.shape[-1] != size:
                logits = F.interpolate(logits, size=(size, size), mode="bilinear")
            parts.append(torch.sigmoid(logits[:, 0]).cpu())
        probabilities = torch.cat(parts).numpy()
        total = probabilities if total is None else total + probabilities
    return total / len(checkpoints), checkpoint


def predict_probabilities(
    checkpoints: list[Path],
    rows: pd.DataFrame,
    images: ArrayFiles,
    masks: ArrayFiles,
    threads: int,
    tta: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Probabilities of ``rows`` (LGG slices), their masks, and the (last) checkpoint dict."""
    device = select_device()
    configure_torch(device, threads)
    pictures = gather(images, rows)
    truth = gather(masks, rows).astype(bool)
    probabilities, checkpoint = probabilities_of(checkpoints, pictures, device, tta, rows)
    return probabilities, truth, checkpoint
