"""Device-side augmentation, training-slice selection, and learning itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import run_script

from brainmri.models import build_classifier, load_checkpoint
from brainmri.training.batches import Augment, Batches, segmentation_training_indices
from brainmri.training.evaluate import accuracy_per_sample
from brainmri.training.loop import FitSettings, configure_torch, epoch_generator, fit


def test_augmentation_moves_image_and_mask_together_and_masks_stay_binary():
    images = torch.zeros(4, 3, 32, 32)
    masks = torch.zeros(4, 1, 32, 32)
    images[:, :, 8:14, 4:10] = 1.0
    masks[:, :, 8:14, 4:10] = 1.0
    augment = Augment(rotation_deg=30, shift_fraction=0.1, hflip=True, vflip=True)
    out_images, out_masks = augment(images, masks, torch.Generator().manual_seed(0))
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_masks, masks)  # the geometry did change
    # The bright square and the mask land in the same place.
    overlap = ((out_images[:, 0] > 0.5) & (out_masks[:, 0] > 0.5)).sum()
    assert overlap >= 0.8 * (out_masks > 0.5).sum()
    again = augment(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_masks)


def test_intensity_augmentation_touches_images_only():
    images = torch.rand(3, 3, 16, 16)
    masks = (torch.rand(3, 1, 16, 16) > 0.5).float()
    out_images, out_masks = Augment(brightness=0.2, contrast=0.2)(
        images, masks, torch.Generator().manual_seed(1)
    )
    assert torch.equal(out_masks, masks)
    assert not torch.equal(out_images, images) and out_images.min() >= 0 and out_images.max() <= 1


def test_training_slice_selection():
    has_tumor = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    generator = torch.Generator().manual_seed(0)
    chosen = segmentation_training_indices(has_tumor, "tumor_plus_empty", 0.5, generator)
    assert sorted(i for i in chosen if has_tumor[i]) == [0, 1, 2, 3]
    assert sum(1 for i in chosen if not has_tumor[i]) == 2
    assert sorted(segmentation_training_indices(has_tumor, "tumor_only", 0, generator)) == [
        0,
        1,
        2,
        3,
    ]
    assert len(segmentation_training_indices(has_tumor, "all", 0, generator)) == 12


def test_empty_slices_are_redrawn_each_epoch():
    has_tumor = np.array([1] * 4 + [0] * 40)
    draws = [
        set(segmentation_training_indices(has_tumor, "tumor_plus_empty", 1.0, generator))
        - {0, 1, 2, 3}
        for generator in (epoch_generator(1, 0), epoch_generator(1, 1), epoch_generator(1, 0))
    ]
    assert len(draws[0]) == 4 and draws[0] != draws[1] and draws[0] == draws[2]


def blobs(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; label 1 has a bright square somewhere (an easy signal)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (count, size, size, 3), dtype=np.uint8)
    labels = np.arange(count) % 2
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 10, 2)
        images[i, y : y + 10, x : x + 10] = 230
    return images, labels


HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
HISTORY_COLUMNS += ["lr", "seconds", "best"]


def run_fit(
    tmp_path,
    model,
    epochs: int,
    lr: float,
    patience: int | None,
    lr_schedule: str = "constant",
    stop_at_epoch: int | None = None,
):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    configure_torch(cpu, 1)
    train = Batches(*blobs(48, 32, 0), 16, cpu, 32, Augment(hflip=True, vflip=True))
    val = Batches(*blobs(24, 32, 1), 16, cpu, 32)

    def train_batches(epoch):
        if epoch == stop_at_epoch:
            raise KeyboardInterrupt  # a job killed after the previous epoch was saved
        generator = epoch_generator(0, epoch)
        return train.epoch(torch.randperm(len(train), generator=generator).numpy(), generator)

    settings = FitSettings(epochs=epochs, lr=lr, patience=patience, seed=0, lr_schedule=lr_schedule)
    result = fit(
        model,
        F.cross_entropy,
        accuracy_per_sample,
        train_batches,
        val.epoch,
        settings,
        cpu,
        tmp_path / "resume",
        "digest",
    )
    return model, result


def test_training_learns_an_easy_signal(tmp_path):
    model = build_classifier({"backbone": "resnet10t", "pretrained": False})
    _, result = run_fit(tmp_path, model, epochs=4, lr=3e-3, patience=None)
    history = pd.DataFrame(result.history)
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    assert history["val_accuracy"].max() >= 0.9
    # The best epoch's weights are returned, and they are the lowest validation loss.
    assert result.best_val_loss == history["val_loss"].min()
    assert history.loc[history["best"] == 1, "epoch"].iloc[-1] == result.best_epoch + 1
    state = (tmp_path / "resume" / "state.pt").is_file()
    assert state and (tmp_path / "resume" / "state.prev.pt").is_file()


def test_early_stopping_keeps_the_best_weights(tmp_path):
    """lr 0, no batch norm: the validation loss never improves after epoch 1, so training stops
    after 1 + patience epochs."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    model, result = run_fit(tmp_path, model, epochs=10, lr=0.0, patience=2)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.best_epoch == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result.best_state.items())


def test_cosine_schedule_anneals_per_epoch_and_resumes_where_it_stopped(tmp_path):
    def classifier():
        torch.manual_seed(0)
        return build_classifier({"backbone": "resnet10t", "pretrained": False})

    model, result = run_fit(tmp_path / "a", classifier(), 4, 1e-3, None, "cosine")
    expected = [1e-3 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4)]
    assert [row["lr"] for row in result.history] == pytest.approx(expected)
    constant = run_fit(tmp_path / "c", classifier(), 2, 1e-3, None)[1]
    assert [row["lr"] for row in constant.history] == [1e-3, 1e-3]

    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path / "b", classifier(), 4, 1e-3, None, "cosine", stop_at_epoch=2)
    resumed_model, resumed = run_fit(tmp_path / "b", classifier(), 4, 1e-3, None, "cosine")
    assert [row["lr"] for row in resumed.history] == [row["lr"] for row in result.history]
    state, resumed_state = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(state[key], resumed_state[key]) for key in state)


def segmenter_settings(**overrides):
    settings = {
        "name": "unet",
        "arch": "Unet",
        "encoder": "resnet18",
        "pretrained": False,
        "input_size": 64,
        "epochs": 2,
        "batch_size": 16,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "patience": None,
        "dice_smooth": 1.0,
        "train_slices": "tumor_plus_empty",
        "empty_fraction": 0.5,
        "augment": {"rotation_deg": 10, "hflip": True, "vflip": True, "brightness": 0.1},
    }
    return {**settings, **overrides}


def train_segmenter(data, out, settings, fold=0, splits=None, weights=""):
    return run_script(
        "train.py",
        "segmentation",
        "--fold",
        fold,
        "--settings",
        json.dumps(settings),
        "--manifest",
        data.manifest,
        "--splits",
        splits or data.splits,
        "--images",
        f"lgg={data.lgg_images}",
        "--masks",
        f"lgg={data.lgg_masks}",
        f"--weights={weights}",
        "--seed",
        "42",
        "--threads",
        "1",
        "--checkpoint",
        out / "model.pt",
        "--history",
        out / "history.csv",
        "--device-json",
        out / "device.json",
        env={"OMP_NUM_THREADS": "1"},
    )


def test_segmenter_trains_on_the_other_folds_and_validates_on_its_own(preprocessed_data, tmp_path):
    result = train_segmenter(preprocessed_data, tmp_path, segmenter_settings())
    assert result.returncode == 0, result.stderr[-3000:]
    splits = pd.read_csv(preprocessed_data.splits)
    train = splits[splits["seg_split"] == "train"]
    n_val = int((train["fold"] == 0).sum())
    assert f"{len(train) - n_val} train" in result.stderr and f"{n_val} val slices" in result.stderr
    assert "Device: CPU" in result.stderr and "Threads: 1" in result.stderr
    history = pd.read_csv(tmp_path / "history.csv")
    expected = ["epoch", "train_loss", "train_dice_all_slices", "train_dice_tumor_slices"]
    expected += ["val_loss", "val_dice_all_slices", "val_dice_tumor_slices", "lr", "seconds"]
    assert list(history.columns) == [*expected, "best"]
    assert len(history) == 2 and history["val_dice_all_slices"].between(0, 1).all()
    model, checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint["task"] == "segmentation" and checkpoint["fold"] == 0
    assert checkpoint["val_loss"] == pytest.approx(history["val_loss"].min())
    # What inference needs: the preprocessing size and the normalisation.
    assert checkpoint["preprocessing"]["array_size"] == 64
    assert checkpoint["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads((tmp_path / "device.json").read_text())["type"] == "cpu"
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert not (tmp_path / "resume").exists()


def test_bad_inputs_fail_before_training(preprocessed_data, tmp_path):
    # An empty validation fold.
    splits = pd.read_csv(preprocessed_data.splits, keep_default_na=False)
    splits.loc[splits["fold"] == 1, "fold"] = 0
    splits.to_csv(tmp_path / "splits.csv", index=False)
    result = train_segmenter(
        preprocessed_data, tmp_path, segmenter_settings(), fold=1, splits=tmp_path / "splits.csv"
    )
    assert result.returncode == 1 and "fold 1 does not exist" in result.stderr
    # Pretrained without the cached encoder weights: the message says how to get them.
    missing = tmp_path / "weights" / "smp" / "resnet18.safetensors"
    result = train_segmenter(
        preprocessed_data, tmp_path, segmenter_settings(pretrained=True), weights=missing
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr and "resnet18" in result.stderr
    assert "--from-file" in result.stderr
    # An image size the encoder cannot take.
    result = train_segmenter(preprocessed_data, tmp_path, segmenter_settings(input_size=80))
    assert result.returncode == 1 and "multiple of 32" in result.stderr
    # Nothing half-written, nothing that looks complete.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits.csv"]
