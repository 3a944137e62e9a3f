"""The two training jobs: a classifier per backbone, a segmenter per (architecture, fold)."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainmri.accelerator import AcceleratorPlan, configure_torch
from brainmri.devices import device_record, select_device
from brainmri.errors import ConfigError, InputError
from brainmri.io import write_csv, write_json
from brainmri.models import check_classifier_config, check_segmenter_config, save_checkpoint
from brainmri.tables import ArrayFiles, load_table
from brainmri.training.evaluate import Preempted, predict_logits
from brainmri.training.loop import (
    EvaluationOutOfMemory,
    FitSettings,
    fit,
    out_of_memory_message,
)
from brainmri.training.losses import selection_column
from brainmri.training.resume import finish_resume, seed_everything, settings_digest
from brainmri.training.setup import TrainingSetup, array_loader, build_training_setup

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """Paths and knobs common to both training stages; every file is named by the rule."""

    settings: dict[str, Any]
    manifest: Path
    splits: Path
    images: ArrayFiles  # {source: images.npy}
    masks: ArrayFiles | None  # {"lgg": masks.npy} (segmentation)
    weights: str | None
    seed: int
    threads: int
    checkpoint: Path
    history: Path
    device_json: Path | None = None

    @property
    def resume_dir(self) -> Path:
        return self.checkpoint.parent / "resume"


def _require(rows: pd.DataFrame, what: str, splits: Path) -> pd.DataFrame:
    if rows.empty:
        raise InputError(f"{splits}: the {what} is empty")
    return rows


def _check_weights(job: TrainJob, library: str, name: str) -> None:
    from brainmri.models import WeightsError, weights_hint

    if job.settings.get("pretrained") and not (job.weights and Path(job.weights).is_file()):
        raise WeightsError(
            weights_hint(
                library, name, job.weights or f"<weights_dir>/{library}/{name}.safetensors"
            )
        )


def _start(job: TrainJob) -> torch.device:
    """Pick the device and configure torch for it."""
    device = select_device(log)
    configure_torch(device, job.threads)
    return device


def _finish(job: TrainJob, device: torch.device, plan: AcceleratorPlan) -> None:
    """After the outputs: record the device and the accelerator plan in ``job.device_json``;
    drop the resume state."""
    if job.device_json is not None:
        write_json(job.device_json, {**device_record(device), "plan": plan.record()})
    finish_resume(job.resume_dir)


def _preprocessing(array_size: int) -> dict[str, Any]:
    """What inference must do to a new image before the model sees it (for the checkpoint)."""
    return {
        "array_size": int(array_size),
        "channels": "RGB as stored; grayscale copied to 3 channels",
        "pad": "zero-pad to a centred square",
        "resize": "bilinear to array_size, then to the model's input_size inside the batches",
        "scale": "uint8 / 255",
    }


@contextmanager
def _oom_hint(stage: str, setup: TrainingSetup, evaluation: bool = False) -> Iterator[None]:
    """Turn CUDA out-of-memory into one line that names the knob: batch_size in training,
    eval_batch_size in validation and test inference, gpu_jobs_per_device on a shared GPU."""
    try:
        yield
    except EvaluationOutOfMemory:
        raise InputError(out_of_memory_message(stage, setup.plan, evaluation=True)) from None
    except torch.OutOfMemoryError:
        message = out_of_memory_message(stage, setup.plan, evaluation, setup.settings)
        raise InputError(message) from None


def _run_fit(job: TrainJob, stage: str, setup: TrainingSetup, device: torch.device):
    fit_settings = FitSettings.from_settings(job.settings, job.seed, setup.metric_name)
    if stage == "segmentation":
        fit_settings.select_on = selection_column(job.settings)
    digest = settings_digest({"settings": job.settings, "seed": job.seed, "stage": stage})
    with _oom_hint(stage, setup):
        return fit(
            setup.model,
            setup.loss_fn,
            setup.metric_fn,
            setup.train_batches,
            setup.val_batches if setup.val_data is not None else None,
            fit_settings,
            device,
            job.resume_dir,
            digest,
            setup.plan,
        )


def train_classifier(job: TrainJob, predictions: Path) -> None:
    """Fine-tune one backbone on LGG train (+ second dataset); predict the LGG test set."""
    settings = job.settings
    name = settings["backbone"]
    check_classifier_config(settings, key=f"classification.backbones.{name}")
    _check_weights(job, "timm", name)
    seed_everything(job.seed)
    device = _start(job)
    table = load_table(job.manifest, job.splits)
    train = _require(
        table[table["cls_split"] == "train"], "classification training split", job.splits
    )
    val = _require(
        table[table["cls_split"] == "val"], "classification validation split", job.splits
    )
    test = _require(table[table["cls_split"] == "test"], "classification test split", job.splits)
    log.info(
        "Classifier %s: %d train, %d val, %d test images at %d px",
        name,
        len(train),
        len(val),
        len(test),
        settings["input_size"],
    )
    load = array_loader(job.images, job.masks)
    setup = build_training_setup(
        "classification", settings, load, train, val, device, job.seed, job.weights, test=test
    )
    result = _run_fit(job, "classification", setup, device)
    model = setup.model
    model.load_state_dict(result.best_state)
    with _oom_hint("classification", setup, evaluation=True):
        logits = predict_logits(model, setup.batches(test).epoch(), device, setup.plan)
    probabilities = torch.softmax(logits, dim=1)[:, 1]
    prob = probabilities.numpy().astype(np.float64)
    frame = pd.DataFrame(
        {
            "id": test["id"].to_numpy(),
            "patient": test["patient"].to_numpy(),
            "label": test["has_tumor"].to_numpy(),
            "prob_tumor": np.round(prob, 6),
        }
    )
    write_csv(predictions, frame)
    write_csv(job.history, pd.DataFrame(result.history))
    save_checkpoint(
        job.checkpoint,
        model,
        "classification",
        settings,
        preprocessing=_preprocessing(setup.train_data.images.shape[1]),
        epoch=result.best_epoch + 1,
        val_loss=result.best_val_loss,
    )
    _finish(job, device, setup.plan)
    log.info("Test predictions of %s: %d slices (scored by evaluate_classifier)", name, len(frame))


def train_segmenter(job: TrainJob, fold: int) -> None:
    """Train one architecture on the training folds except ``fold``; validate on ``fold``."""
    settings = job.settings
    name = settings["name"]
    check_segmenter_config(settings, key=f"segmentation.architectures.{name}")
    _check_weights(job, "smp", settings["encoder"])
    seed_everything(job.seed + fold)
    device = _start(job)
    table = load_table(job.manifest, job.splits)
    lgg = table[table["seg_split"] == "train"]
    if fold not in set(lgg["fold"]):
        raise ConfigError(f"split.folds: fold {fold} does not exist in {job.splits}")
    train = _require(lgg[lgg["fold"] != fold], f"training part of fold {fold}", job.splits)
    val = _require(lgg[lgg["fold"] == fold], f"validation fold {fold}", job.splits)
    size = settings["input_size"]
    log.info(
        "Segmenter %s (%s/%s) fold %d: %d train (%d with tumor), %d val slices at %d px",
        name,
        settings["arch"],
        settings["encoder"],
        fold,
        len(train),
        int(train["has_tumor"].sum()),
        len(val),
        size,
    )
    select_on = selection_column(settings)
    if select_on != "val_loss" and not val["has_tumor"].any():
        raise InputError(
            f"{job.splits}: validation fold {fold} has no tumor slice, so "
            f"segmentation.select_on: {settings['select_on']} cannot score it"
        )
    load = array_loader(job.images, job.masks)
    seed = job.seed + 1000 * fold
    setup = build_training_setup(
        "segmentation", settings, load, train, val, device, seed, job.weights
    )
    result = _run_fit(job, "segmentation", setup, device)
    model = setup.model
    model.load_state_dict(result.best_state)
    write_csv(job.history, pd.DataFrame(result.history))
    save_checkpoint(
        job.checkpoint,
        model,
        "segmentation",
        settings,
        preprocessing=_preprocessing(setup.train_data.images.shape[1]),
        validation_threshold=0.5,  # the val_dice of the history (dice_per_sample: logits > 0)
        fold=fold,
        epoch=result.best_epoch + 1,
        val_loss=result.best_val_loss,
    )
    _finish(job, device, setup.plan)


def best_epoch_of(history: Path) -> int:
    """The epoch (1-based) a fold model's checkpoint holds: the last improvement (``best`` 1)
    in its history.csv."""
    try:
        frame = pd.read_csv(history)
    except (OSError, ValueError) as error:
        raise InputError(f"{history}: unreadable training history ({error})") from None
    if not {"epoch", "best"} <= set(frame.columns):
        raise InputError(f"{history}: not a training history (no 'epoch' and 'best' columns)")
    best = frame.loc[frame["best"] == 1, "epoch"]
    if best.empty:
        raise InputError(f"{history}: no epoch improved on validation (no best epoch)")
    return int(best.iloc[-1])


def final_epochs(histories: list[Path]) -> int:
    """Epochs of the final model (``segmentation.final_model.epochs: null``): the median of the
    fold models' best epochs, rounded half up (validation folds only, never the test set)."""
    if not histories:
        raise InputError("final model: no fold histories to choose its epochs from")
    return max(1, math.floor(statistics.median(best_epoch_of(h) for h in histories) + 0.5))


def final_training_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Every non-test LGG slice (``seg_split`` train, all folds): the final model's data."""
    return table[table["seg_split"] == "train"]


def train_final_segmenter(job: TrainJob, epochs: int) -> None:
    """Train one architecture on every training patient (all folds) for ``epochs`` epochs
    with the configured schedule, without validation or early stopping; keep the last epoch."""
    settings = {**job.settings, "epochs": int(epochs), "patience": None}
    warmup = settings.get("warmup_epochs", 0)
    if settings.get("lr_schedule") == "warmup_cosine" and settings["epochs"] <= warmup:
        log.warning("%d epochs <= %d warm-up epochs: training %d", epochs, warmup, warmup + 1)
        settings["epochs"] = warmup + 1
    job = replace(job, settings=settings)
    name = settings["name"]
    check_segmenter_config(settings, key=f"segmentation.architectures.{name}")
    _check_weights(job, "smp", settings["encoder"])
    seed_everything(job.seed - 1)  # fold k uses seed + k: the final model is its own stream
    device = _start(job)
    table = load_table(job.manifest, job.splits)
    train = _require(final_training_rows(table), "segmentation training split", job.splits)
    log.info(
        "Final segmenter %s (%s/%s): %d slices of %d patients (%d with tumor), %d epochs, "
        "no validation, at %d px",
        name,
        settings["arch"],
        settings["encoder"],
        len(train),
        train["patient"].nunique(),
        int(train["has_tumor"].sum()),
        settings["epochs"],
        settings["input_size"],
    )
    load = array_loader(job.images, job.masks)
    setup = build_training_setup(
        "segmentation", settings, load, train, None, device, job.seed - 1000, job.weights
    )
    result = _run_fit(job, "segmentation", setup, device)
    setup.model.load_state_dict(result.best_state)
    write_csv(job.history, pd.DataFrame(result.history))
    save_checkpoint(
        job.checkpoint,
        setup.model,
        "segmentation",
        settings,
        preprocessing=_preprocessing(setup.train_data.images.shape[1]),
        fold="all",
        epoch=result.best_epoch + 1,
        val_loss=None,
        training_patients=int(train["patient"].nunique()),
    )
    _finish(job, device, setup.plan)


__all__ = [
    "Preempted",
    "TrainJob",
    "final_epochs",
    "train_classifier",
    "train_final_segmenter",
    "train_segmenter",
]
