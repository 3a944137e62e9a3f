"""The two training jobs: a classifier per backbone, a segmenter per (architecture, fold)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from brainmri.devices import device_record, select_device
from brainmri.errors import ConfigError, InputError
from brainmri.io import write_csv, write_json
from brainmri.models import (
    build_classifier,
    build_segmenter,
    check_classifier_config,
    check_segmenter_config,
    save_checkpoint,
)
from brainmri.tables import ArrayFiles, gather, load_table
from brainmri.training.batches import Augment, Batches, segmentation_training_indices
from brainmri.training.loop import (
    FitSettings,
    Preempted,
    accuracy_per_sample,
    configure_torch,
    dice_per_sample,
    epoch_generator,
    finish_resume,
    fit,
    out_of_memory_message,
    predict_logits,
    seed_everything,
    settings_digest,
)

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


def _finish(job: TrainJob, device: torch.device) -> None:
    """After the outputs: record the device in ``job.device_json``; drop the resume state."""
    if job.device_json is not None:
        write_json(job.device_json, device_record(device))
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
def _oom_hint(stage: str, batch_size: int) -> Iterator[None]:
    """Turn CUDA out-of-memory into one line that names the batch_size knob."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise InputError(out_of_memory_message(stage, batch_size)) from None


def _run_fit(
    job: TrainJob,
    stage: str,
    model,
    loss_fn,
    metric_fn,
    train_batches,
    val_batches,
    metric_name: str,
    device: torch.device,
):
    fit_settings = FitSettings(
        epochs=job.settings["epochs"],
        lr=job.settings["lr"],
        weight_decay=job.settings.get("weight_decay", 0.0),
        patience=job.settings.get("patience"),
        seed=job.seed,
        metric_name=metric_name,
        lr_schedule=job.settings.get("lr_schedule", "constant"),
    )
    digest = settings_digest({"settings": job.settings, "seed": job.seed, "stage": stage})
    with _oom_hint(stage, job.settings["batch_size"]):
        return fit(
            model,
            loss_fn,
            metric_fn,
            train_batches,
            val_batches,
            fit_settings,
            device,
            job.resume_dir,
            digest,
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
    size, batch = settings["input_size"], settings["batch_size"]
    channels_last = device.type == "cuda"
    train_data = Batches(
        gather(job.images, train),
        train["has_tumor"].to_numpy(),
        batch,
        device,
        size,
        Augment.from_settings(settings),
        channels_last,
    )
    val_data = Batches(
        gather(job.images, val),
        val["has_tumor"].to_numpy(),
        batch,
        device,
        size,
        None,
        channels_last,
    )
    model = build_classifier(settings, job.weights)

    def train_batches(epoch: int):
        generator = epoch_generator(job.seed, epoch)
        order = torch.randperm(len(train_data), generator=generator).numpy()
        return train_data.epoch(order, generator)

    result = _run_fit(
        job,
        "classification",
        model,
        F.cross_entropy,
        accuracy_per_sample,
        train_batches,
        val_data.epoch,
        "accuracy",
        device,
    )
    model.load_state_dict(result.best_state)
    test_data = Batches(
        gather(job.images, test),
        test["has_tumor"].to_numpy(),
        batch,
        device,
        size,
        None,
        channels_last,
    )
    with _oom_hint("classification", batch):
        logits = predict_logits(model, test_data.epoch(), device)
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
        preprocessing=_preprocessing(train_data.images.shape[1]),
        epoch=result.best_epoch + 1,
        val_loss=result.best_val_loss,
    )
    _finish(job, device)
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
    size, batch = settings["input_size"], settings["batch_size"]
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
    channels_last = device.type == "cuda"
    train_data = Batches(
        gather(job.images, train),
        gather(job.masks, train),
        batch,
        device,
        size,
        Augment.from_settings(settings),
        channels_last,
    )
    val_data = Batches(
        gather(job.images, val),
        gather(job.masks, val),
        batch,
        device,
        size,
        None,
        channels_last,
    )
    has_tumor = train["has_tumor"].to_numpy().astype(bool)
    model = build_segmenter(settings, job.weights)
    loss_fn = smp.losses.DiceLoss("binary", from_logits=True, smooth=settings["dice_smooth"])

    def train_batches(epoch: int):
        generator = epoch_generator(job.seed + 1000 * fold, epoch)
        indices = segmentation_training_indices(
            has_tumor, settings["train_slices"], settings["empty_fraction"], generator
        )
        return train_data.epoch(indices, generator)

    result = _run_fit(
        job,
        "segmentation",
        model,
        loss_fn,
        dice_per_sample,
        train_batches,
        val_data.epoch,
        "dice",
        device,
    )
    model.load_state_dict(result.best_state)
    write_csv(job.history, pd.DataFrame(result.history))
    save_checkpoint(
        job.checkpoint,
        model,
        "segmentation",
        settings,
        preprocessing=_preprocessing(train_data.images.shape[1]),
        validation_threshold=0.5,  # the val_dice of the history (dice_per_sample: logits > 0)
        fold=fold,
        epoch=result.best_epoch + 1,
        val_loss=result.best_val_loss,
    )
    _finish(job, device)


__all__ = ["Preempted", "TrainJob", "train_classifier", "train_segmenter"]
