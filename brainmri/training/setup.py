"""One training setup for both tasks: model, loss, metric and batch providers from the settings
and the table rows. Used by the training jobs (brainmri.training.jobs) and the benchmark
(bench/benchmark.py), so that what is benchmarked is what trains."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainmri.accelerator import AcceleratorPlan, make_plan
from brainmri.models import build_classifier, build_segmenter
from brainmri.tables import ArrayFiles, gather
from brainmri.training.batches import (
    Augment,
    Batches,
    make_resident,
    resident_fits,
    segmentation_training_indices,
)
from brainmri.training.context import with_context
from brainmri.training.evaluate import accuracy_per_sample, segmentation_metrics
from brainmri.training.loop import epoch_generator
from brainmri.training.losses import segmentation_loss
from brainmri.training.modality import with_modality_dropout

log = logging.getLogger(__name__)

TASKS = ("classification", "segmentation")
# Arrays of table rows: load(rows, "images") -> uint8 (N, S, S, 3); load(rows, "masks") ->
# uint8 (N, S, S). The jobs and the benchmark say where the arrays are by passing one.
Loader = Callable[[pd.DataFrame, str], np.ndarray]
# Evaluation batch on the CPU: the training batch (classification, validation) or this
# (segmentation inference), as before eval_batch_size existed, so CPU results stay the same.
CPU_INFERENCE_BATCH = 32


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
    plan: AcceleratorPlan
    test_counted: bool = False  # the plan's residency decision counted the test rows
    # train_slices area_weighted: each training slice's tumor pixels at the array size, and
    # its patient (None otherwise).
    tumor_area: np.ndarray | None = None
    patients: np.ndarray | None = None

    @property
    def resident(self) -> bool:
        return self.plan.resident

    @property
    def eval_batch(self) -> int:
        return self.plan.eval_batch

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
                self.tumor_area,
                self.patients,
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
        """Unaugmented evaluation batches of other rows (e.g. the test split): on the device
        when the plan's one residency decision (which counted the test rows) said so, placed
        after the training's cached blocks were freed."""
        arrays = task_arrays(self.task, self.settings, self.load, rows)
        if self.plan.resident and self.plan.cuda:
            torch.cuda.empty_cache()
        return data_batches(
            self.settings, arrays, self.plan, self.eval_batch, None, what, self.test_counted
        )


def task_arrays(
    task: str, settings: dict[str, Any], load: Loader, rows: pd.DataFrame
) -> list[np.ndarray]:
    """[uint8 images (2.5D: with their neighbours' channels), targets] of ``rows``."""
    images, targets = load(rows, "images"), targets_of(task, load, rows)
    if task == "segmentation":  # 2.5D: neighbouring slices' channels (slice_context)
        images = with_context(images, rows, settings.get("slice_context", 0))
    return [images, targets]


def data_batches(
    settings: dict[str, Any],
    arrays: list[np.ndarray],
    plan: AcceleratorPlan,
    batch_size: int,
    augment: Augment | None,
    what: str,
    decided: bool = True,
) -> Batches:
    """:class:`Batches` of ``arrays``, on the device where ``plan.resident`` (``decided``:
    the plan's decision covered them, else they are checked against the plan's share)."""
    if plan.resident:
        arrays = make_resident(arrays, plan, f"{what} data", decided=decided)
    return Batches(
        arrays[0], arrays[1], batch_size, plan.device, settings["input_size"], augment,
        plan.channels_last, plan.pin_memory,
    )  # fmt: skip


def decide_residency(
    plan: AcceleratorPlan, nbytes: int, forced: bool | None, what: str
) -> AcceleratorPlan:
    """One decision for all of a job's arrays (``nbytes``: train, validation and test
    together): on the device when the plan places data there and they fit its share of the
    device (brainmri.training.batches.resident_fits); ``forced`` True/False overrides."""
    if forced is not None:
        return replace(plan, resident=forced)
    if not plan.resident:
        return plan
    fits, free = resident_fits(nbytes, plan)
    if not fits:
        log.info(
            "%s: %.2f GB do not fit %.0f %% of %s's memory (%.2f GB free): pinned host batches",
            what, nbytes / 1e9, 100 * plan.memory_share, plan.device, free / 1e9,
        )  # fmt: skip
    return replace(plan, resident=fits)


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
    plan: AcceleratorPlan | None = None,
    test: pd.DataFrame | None = None,
) -> TrainingSetup:
    """Model, loss, metric, training and validation batches of one job, as the jobs train.

    ``val`` None: no validation batches (``val_data`` None, a final model). ``plan``: the job's
    accelerator plan (None: :func:`brainmri.accelerator.make_plan` of ``device`` and the
    settings); its residency is decided here once for the train, validation and ``test`` rows
    together. ``resident`` True/False forces the device-resident or the host path (tests,
    benchmark).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    batch = settings["batch_size"]
    plan = plan or make_plan(device, settings, batch)
    loss_fn, metric_fn, metric_name = loss_and_metric(task, settings)
    augment = Augment.from_settings(settings)
    train_arrays = task_arrays(task, settings, load, train)
    val_arrays = None if val is None else task_arrays(task, settings, load, val)
    nbytes = sum(int(a.nbytes) for a in [*train_arrays, *(val_arrays or [])])
    if test is not None and len(train):  # the test rows hold as many bytes per row
        nbytes += round(nbytes / (len(train) + len(val if val is not None else [])) * len(test))
    plan = decide_residency(plan, nbytes, resident, f"{task} data")
    weighted = task == "segmentation" and settings.get("train_slices") == "area_weighted"
    masks = train_arrays[1]
    log.info("%s", plan.describe())
    return TrainingSetup(
        task=task,
        settings=settings,
        model=build_task_model(task, settings, weights),
        loss_fn=loss_fn,
        metric_fn=metric_fn,
        metric_name=metric_name,
        train_data=data_batches(settings, train_arrays, plan, batch, augment, f"{task} train"),
        val_data=None
        if val_arrays is None
        else data_batches(settings, val_arrays, plan, plan.eval_batch, None, f"{task} validation"),
        epoch_seed=epoch_seed,
        has_tumor=train["has_tumor"].to_numpy().astype(bool),
        load=load,
        device=device,
        plan=plan,
        test_counted=test is not None or resident is not None,
        tumor_area=masks.reshape(len(masks), -1).sum(1, dtype=np.int64) if weighted else None,
        patients=train["patient"].to_numpy() if weighted else None,
    )
