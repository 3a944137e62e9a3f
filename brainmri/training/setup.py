"""One training setup for both tasks: model, loss, metric and batch providers from the settings
and the table rows. Used by the training jobs (brainmri.training.jobs) and the benchmark
(bench/benchmark.py), so that what is benchmarked is what trains."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainmri.models import build_classifier, build_segmenter
from brainmri.tables import ArrayFiles, gather
from brainmri.training.batches import (
    Augment,
    Batches,
    make_resident,
    segmentation_training_indices,
)
from brainmri.training.context import with_context
from brainmri.training.evaluate import accuracy_per_sample, segmentation_metrics
from brainmri.training.loop import epoch_generator
from brainmri.training.losses import segmentation_loss
from brainmri.training.modality import with_modality_dropout

TASKS = ("classification", "segmentation")
# Arrays of table rows: load(rows, "images") -> uint8 (N, S, S, 3); load(rows, "masks") ->
# uint8 (N, S, S). The jobs and the benchmark say where the arrays are by passing one.
Loader = Callable[[pd.DataFrame, str], np.ndarray]
# Evaluation batch on the CPU: the training batch (classification, validation) or this
# (segmentation inference), as before eval_batch_size existed, so CPU results stay the same.
CPU_INFERENCE_BATCH = 32


def default_eval_batch(device: torch.device, fallback: int) -> int:
    """``eval_batch_size: null``: ``fallback`` on the CPU; on CUDA 256 from 40 GB of device
    memory, else 64 (inference keeps no activations, so it fits far larger batches)."""
    if device.type != "cuda":
        return fallback
    total = torch.cuda.get_device_properties(device).total_memory
    return 256 if total >= 40e9 else 64


def eval_batch_size(settings: dict[str, Any], device: torch.device, fallback: int) -> int:
    return settings.get("eval_batch_size") or default_eval_batch(device, fallback)


def loss_and_metric(task: str, settings: dict[str, Any]) -> tuple[Callable, Callable, str]:
    """The training loss, the per-sample validation metric and its name."""
    if task == "classification":
        return F.cross_entropy, accuracy_per_sample, "accuracy"

    return segmentation_loss(settings), segmentation_metrics, "dice"


def build_task_model(
    task: str, settings: dict[str, Any], weights: str | None = None
) -> torch.nn.Module:
    if task == "classification":
        return build_classifier(settings, weights)
    return build_segmenter(settings, weights)


def folder_loader(data_dir: Path) -> Loader:
    """A :data:`Loader` of the arrays in a data folder (``<data_dir>/<source>/<kind>.npy``)."""
    return lambda rows, kind: gather(data_dir, rows, kind)


def array_loader(images: ArrayFiles, masks: ArrayFiles | None) -> Loader:
    """A :data:`Loader` of the image and mask files a rule named (``{source: path}``)."""
    return lambda rows, kind: gather(images if kind == "images" else masks, rows)


def targets_of(task: str, load: Loader, rows: pd.DataFrame) -> np.ndarray:
    """Labels (classification) or uint8 masks (segmentation) of ``rows``."""
    if task == "classification":
        return rows["has_tumor"].to_numpy()
    return load(rows, "masks")


@dataclass
class TrainingSetup:
    """Everything :func:`brainmri.training.loop.fit` needs besides its settings."""

    task: str
    settings: dict[str, Any]
    model: torch.nn.Module
    loss_fn: Callable
    metric_fn: Callable
    metric_name: str
    train_data: Batches
    val_data: Batches | None  # None: no validation (a final model on every training patient)
    epoch_seed: int
    has_tumor: np.ndarray
    load: Loader
    device: torch.device
    resident: bool | None
    eval_batch: int

    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, torch.Generator]:
        """The training slices of ``epoch`` in order, and the generator that augments them."""
        generator = epoch_generator(self.epoch_seed, epoch)
        if self.task == "classification":
            order = torch.randperm(len(self.train_data), generator=generator).numpy()
        else:
            order = segmentation_training_indices(
                self.has_tumor,
                self.settings["train_slices"],
                self.settings["empty_fraction"],
                generator,
            )
        return order, generator

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, generator = self.epoch_indices(epoch)
        batches = self.train_data.epoch(order, generator)
        dropout = self.settings.get("modality_dropout", 0.0) if self.task != "classification" else 0
        return with_modality_dropout(batches, dropout, generator) if dropout else batches

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.val_data.epoch()

    def batches(self, rows: pd.DataFrame, what: str = "test") -> Batches:
        """Unaugmented evaluation batches of other rows (e.g. the test split)."""
        return data_batches(
            self.task, self.settings, self.load, rows, self.device, self.eval_batch,
            None, self.resident, what,
        )  # fmt: skip


def data_batches(
    task: str,
    settings: dict[str, Any],
    load: Loader,
    rows: pd.DataFrame,
    device: torch.device,
    batch_size: int,
    augment: Augment | None,
    resident: bool | None,
    what: str,
) -> Batches:
    """:class:`Batches` of ``rows``; on the device when ``resident`` (None: on CUDA when the
    arrays fit ``settings["resident_share"]`` of the free memory, never on the CPU)."""
    images, targets = load(rows, "images"), targets_of(task, load, rows)
    if task == "segmentation":  # 2.5D: neighbouring slices' channels (slice_context)
        images = with_context(images, rows, settings.get("slice_context", 0))
    if resident is None:
        resident = device.type == "cuda"
        share = settings.get("resident_share", 0.5)
    else:
        share = float("inf") if resident else 0.0
    if resident:
        images, targets = make_resident([images, targets], device, share, f"{task} {what} data")
    return Batches(
        images, targets, batch_size, device, settings["input_size"], augment,
        device.type == "cuda",
    )  # fmt: skip


def build_training_setup(
    task: str,
    settings: dict[str, Any],
    load: Loader,
    train: pd.DataFrame,
    val: pd.DataFrame | None,
    device: torch.device,
    epoch_seed: int,
    weights: str | None = None,
    resident: bool | None = None,
) -> TrainingSetup:
    """Model, loss, metric, training and validation batches of one job, as the jobs train.

    ``val`` None: no validation batches (``val_data`` None, a final model). ``resident``: None
    chooses (CUDA: the arrays on the device if they fit); True/False forces the device-resident
    or the host path (tests, benchmark).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    batch = settings["batch_size"]
    evaluation = eval_batch_size(settings, device, batch)
    loss_fn, metric_fn, metric_name = loss_and_metric(task, settings)
    augment = Augment.from_settings(settings)
    return TrainingSetup(
        task=task,
        settings=settings,
        model=build_task_model(task, settings, weights),
        loss_fn=loss_fn,
        metric_fn=metric_fn,
        metric_name=metric_name,
        train_data=data_batches(
            task, settings, load, train, device, batch, augment, resident, "train"
        ),
        val_data=None
        if val is None
        else data_batches(
            task, settings, load, val, device, evaluation, None, resident, "validation"
        ),
        epoch_seed=epoch_seed,
        has_tumor=train["has_tumor"].to_numpy().astype(bool),
        load=load,
        device=device,
        resident=resident,
        eval_batch=evaluation,
    )
