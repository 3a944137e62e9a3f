"""Batched inference shared by evaluation, the fold ensemble and predict.

Large batches (the checkpoint's ``eval_batch_size``, else sized for the device), precision and
channels_last from the accelerator plan of the checkpoint's settings (as in training), the
images resident on the GPU when they fit, and the
sigmoid/resize done on the device per batch: no per-slice Python work. The models' mean
probability is accumulated and quantized to the stored uint8 form on the device, and the overlap
sums of evaluation are taken there too (brainmri.inference.overlap), so one byte per pixel
crosses to the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainmri.accelerator import (
    AcceleratorPlan,
    configure_torch,
    default_plan,
    make_plan,
    release_device,
)
from brainmri.devices import select_device
from brainmri.errors import InputError
from brainmri.inference.overlap import overlap_counts_on
from brainmri.inference.tta import with_tta
from brainmri.models import load_checkpoint
from brainmri.tables import ArrayFiles, gather
from brainmri.training.batches import Batches, make_resident
from brainmri.training.context import with_context
from brainmri.training.setup import CPU_INFERENCE_BATCH

log = logging.getLogger(__name__)


def inference_plan(device: torch.device, checkpoint: dict[str, Any]) -> AcceleratorPlan:
    """The accelerator plan of a checkpoint's settings on ``device`` (its precision, its
    ``eval_batch_size`` or one sized for the device; 32 on the CPU)."""
    return make_plan(device, checkpoint["settings"], CPU_INFERENCE_BATCH)


def load_for_inference(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A checkpoint's model in eval mode on ``device`` (channels_last where its plan says)."""
    model, checkpoint = load_checkpoint(path, device)
    inference_plan(device, checkpoint).prepare_model(model)
    return model, checkpoint


@dataclass
class Loaded:
    """A segmenter loaded once (:func:`load_segmenter`), its flip TTA applied or not."""

    path: Path
    model: torch.nn.Module
    checkpoint: dict[str, Any]


def load_segmenter(path: Path, device: torch.device, tta: bool) -> Loaded:
    model, checkpoint = load_for_inference(path, device)
    return Loaded(path, with_tta(model, tta), checkpoint)


def place(images: np.ndarray, device: torch.device) -> tuple[Any, Any]:
    """Images (and dummy targets) for :func:`inference_batches`: on the device when the plan
    places data there and they fit its share."""
    plan = default_plan(device)
    if not plan.resident:
        return images, np.zeros(len(images))
    placed = make_resident([images], plan, "inference images")[0]
    dummy = torch.zeros(len(images), device=device) if isinstance(placed, torch.Tensor) else None
    return placed, dummy if dummy is not None else np.zeros(len(images))


def inference_batches(placed: tuple[Any, Any], checkpoint: dict, device: torch.device) -> Batches:
    plan = inference_plan(device, checkpoint)
    images, targets = placed
    size = checkpoint["input_size"]
    return Batches(
        images, targets, plan.eval_batch, device, size, None, plan.channels_last, plan.pin_memory
    )


def quantize_on(probabilities: torch.Tensor) -> torch.Tensor:
    """brainmri.evaluation.masks.quantize on the device: the same float32 arithmetic (clip,
    x 255) and rounding (half to even), so the same uint8 from the same probabilities."""
    scaled = probabilities.clamp(0, 1)  # a new tensor: the rest works in place (faster on CPUs)
    return scaled.mul_(255).round_().to(torch.uint8)


@torch.no_grad()
def _model_probabilities(
    checkpoints: list[Path | Loaded],
    images: np.ndarray,
    device: torch.device,
    tta: bool,
    rows: pd.DataFrame | None,
    stored: bool,
    placed: tuple[Any, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The models' mean float32 sigmoid probability (N, S, S) on ``device``, or (``stored``)
    its quantized uint8 form; one model: quantized batch by batch, no float array at all.
    ``checkpoints``: paths (each loaded here) or models loaded once (:class:`Loaded`, their
    own TTA); ``placed``: ``images`` already placed on the device (:func:`place`)."""
    if not checkpoints:
        raise InputError("no segmentation model to predict with")
    n, size = len(images), images.shape[1]
    quantize_batches = stored and len(checkpoints) == 1
    dtype = torch.uint8 if quantize_batches else torch.float32
    result = torch.empty((n, size, size), dtype=dtype, device=device)
    placed = place(images, device) if placed is None else placed
    checkpoint: dict[str, Any] = {}
    for number, item in enumerate(checkpoints):
        loaded = item if isinstance(item, Loaded) else load_segmenter(item, device, tta)
        path, model, checkpoint = loaded.path, loaded.model, loaded.checkpoint
        inputs = placed
        context = checkpoint["settings"].get("slice_context", 0)
        if context:
            if rows is None:
                raise InputError(
                    f"{path}: a 2.5D model (slice_context {context}) needs each slice's "
                    "neighbours; it cannot predict single images"
                )
            inputs = place(with_context(images, rows, context), device)
        offset = 0
        plan = inference_plan(device, checkpoint)
        log.info("%s: %s", path.name, plan.describe())
        for batch, _ in inference_batches(inputs, checkpoint, device).epoch():
            with plan.autocast():
                logits = model(batch)
            logits = logits.float()
            if logits.shape[-1] != size:
                logits = F.interpolate(logits, size=(size, size), mode="bilinear")
            probabilities = torch.sigmoid(logits[:, 0])
            end = offset + len(probabilities)
            if quantize_batches:
                result[offset:end] = quantize_on(probabilities)
            elif number == 0:
                result[offset:end] = probabilities
            else:
                result[offset:end] += probabilities
            offset = end
    if len(checkpoints) > 1:
        # A 0-dim tensor on the device: a true division everywhere (CUDA turns a division by a
        # Python number into a multiplication by its reciprocal), as NumPy divided before.
        result /= torch.tensor(float(len(checkpoints)), device=device)
        if stored:
            result = quantize_on(result)
    return result, checkpoint


def probabilities_of(
    checkpoints: list[Path],
    images: np.ndarray,
    device: torch.device,
    tta: bool = False,
    rows: pd.DataFrame | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mean sigmoid probability (N, S, S), float32 on the host, of the models on uint8 images
    (N, S, S, 3); with ``tta`` each model's logits are the mean over flips
    (brainmri.inference.tta). ``rows`` (manifest rows of the images: patient, slice_index) feed
    2.5D models their neighbours. Where only masks are needed, :func:`stored_probabilities`
    moves a quarter of the bytes."""
    probabilities, checkpoint = _model_probabilities(
        checkpoints, images, device, tta, rows, stored=False
    )
    return probabilities.cpu().numpy(), checkpoint


def stored_probabilities(
    checkpoints: list[Path | Loaded],
    images: np.ndarray,
    device: torch.device,
    tta: bool = False,
    rows: pd.DataFrame | None = None,
    placed: tuple[Any, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The models' stored probabilities: uint8 (N, S, S) on ``device``, equal to
    ``quantize(probabilities_of(...)[0])`` (mean of the float probabilities, then quantized, all
    on the device); ``.cpu().numpy()`` brings one byte per pixel to the host."""
    return _model_probabilities(checkpoints, images, device, tta, rows, True, placed)


@dataclass
class ScoredSlices:
    """What :func:`segment_and_count` returns, on the host."""

    stored: np.ndarray  # uint8 (N, S, S) stored probabilities
    truth: np.ndarray  # bool (N, S, S) true masks
    counts: np.ndarray | None  # int64 (N, 3): |P∩T|, |P|, |T| at the threshold; None: not asked
    checkpoint: dict[str, Any]  # the (last) checkpoint dict


def segment_and_count(
    checkpoints: list[Path],
    rows: pd.DataFrame,
    images: ArrayFiles,
    masks: ArrayFiles,
    threads: int,
    threshold: float | None,
    tta: bool = False,
) -> ScoredSlices:
    """Stored probabilities of ``rows`` (LGG slices), their masks, and the overlap sums of the
    thresholded probabilities with the masks, computed on the inference device (the masks are
    put there like the images); only uint8 probabilities and the sums come back. ``threshold``
    None: no sums (the caller post-processes the masks first and counts on the host). The
    device's job slot is released before returning: what follows (HD, ASSD) runs on the CPU, so
    another GPU job may take the slot meanwhile."""
    device = select_device()
    configure_torch(device, threads)
    pictures = gather(images, rows)
    truth = gather(masks, rows).astype(bool)
    stored, checkpoint = stored_probabilities(checkpoints, pictures, device, tta, rows)
    counts = None
    if threshold is not None:
        on_device = truth
        plan = default_plan(device)
        if plan.resident:
            on_device = make_resident([truth], plan, "inference masks")[0]
        counts = overlap_counts_on(stored, on_device, threshold)
        del on_device
    host = stored.cpu().numpy()
    del stored
    release_device(default_plan(device))
    return ScoredSlices(host, truth, counts, checkpoint)
