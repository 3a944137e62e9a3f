"""The GPU throughput paths, checked on the CPU: device-resident data (same numbers as the host
path), its pinned-host fallback, evaluation batch sizes, validate-every-N, optional compile."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from brainmri.accelerator import AcceleratorPlan
from brainmri.models import build_classifier
from brainmri.tables import load_table
from brainmri.training import batches as batches_module
from brainmri.training.batches import Augment, Batches, make_resident, resident_fits
from brainmri.training.evaluate import accuracy_per_sample, evaluate_all
from brainmri.training.loop import FitSettings, configure_torch, epoch_generator, fit
from brainmri.training.setup import build_training_setup, folder_loader

CPU = torch.device("cpu")
CPU_PLAN = AcceleratorPlan(device=CPU)


def blobs(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
    masks = (rng.random((count, size, size)) > 0.7).astype(np.uint8)
    return images, masks


def test_resident_batches_equal_host_batches_with_augmentation():
    images, masks = blobs(21, 32, 0)
    augment = Augment(rotation_deg=20, shift_fraction=0.1, hflip=True, vflip=True, brightness=0.2)
    host = Batches(images, masks, 8, CPU, 32, augment)
    resident = Batches(*make_resident([images, masks], CPU_PLAN), 8, CPU, 32, augment)
    assert resident.resident and not host.resident
    order = np.random.default_rng(1).permutation(21)
    pairs = zip(
        host.epoch(order, epoch_generator(0, 3)),
        resident.epoch(order, epoch_generator(0, 3)),
        strict=True,
    )
    for (a_images, a_masks), (b_images, b_masks) in pairs:
        assert torch.equal(a_images, b_images) and torch.equal(a_masks, b_masks)


def fit_setup(setup, tmp_path, epochs=2, **fit_options):
    configure_torch(CPU, 1)
    settings = FitSettings.from_settings(setup.settings, 7, setup.metric_name)
    for key, value in fit_options.items():
        setattr(settings, key, value)
    return fit(
        setup.model, setup.loss_fn, setup.metric_fn, setup.train_batches, setup.val_batches,
        settings, CPU, tmp_path / "resume", "digest",
    )  # fmt: skip


SETTINGS = {
    "classification": {
        "backbone": "resnet10t", "pretrained": False, "input_size": 64, "epochs": 2,
        "batch_size": 8, "lr": 1e-3, "augment": {"rotation_deg": 15, "hflip": True},
    },
    "segmentation": {
        "name": "unet", "arch": "Unet", "encoder": "resnet18", "pretrained": False,
        "input_size": 64, "epochs": 2, "batch_size": 8, "lr": 1e-3, "dice_smooth": 1.0,
        "train_slices": "tumor_plus_empty", "empty_fraction": 0.5,
        "augment": {"rotation_deg": 10, "hflip": True, "brightness": 0.1},
    },
}  # fmt: skip


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_resident_path_trains_exactly_like_the_host_path_on_the_cpu(
    task, preprocessed_data, tmp_path
):
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    if task == "classification":
        train, val = table[table["cls_split"] == "train"], table[table["cls_split"] == "val"]
    else:
        lgg = table[table["seg_split"] == "train"]
        train, val = lgg[lgg["fold"] != 0], lgg[lgg["fold"] == 0]
    results = {}
    for resident in (False, True):
        torch.manual_seed(0)
        setup = build_training_setup(
            task, SETTINGS[task], folder_loader(preprocessed_data.data_dir), train, val, CPU, 7,
            resident=resident,
        )  # fmt: skip
        assert setup.train_data.resident is resident and setup.val_data.resident is resident
        assert setup.eval_batch == 8  # the CPU default: the training batch
        results[resident] = fit_setup(setup, tmp_path / str(resident))
    host, device = results[False], results[True]
    drop = ["seconds"]
    assert (
        pd.DataFrame(host.history)
        .drop(columns=drop)
        .equals(pd.DataFrame(device.history).drop(columns=drop))
    )
    assert host.best_epoch == device.best_epoch
    assert all(torch.equal(v, device.best_state[k]) for k, v in host.best_state.items())


def fake_cuda_memory(monkeypatch, free: int, total: int = 80 * 10**9) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))


def test_arrays_larger_than_the_share_of_memory_stay_on_the_host(monkeypatch, caplog):
    cuda = AcceleratorPlan(device=torch.device("cuda", 0), cuda=True, memory_share=0.5)
    fake_cuda_memory(monkeypatch, free=1000, total=2000)
    assert resident_fits(1000, cuda) == (True, 1000)
    assert resident_fits(1001, cuda) == (False, 1000)  # more than is free
    fake_cuda_memory(monkeypatch, free=2000, total=2000)
    assert resident_fits(1001, cuda) == (False, 2000)  # more than the job's share
    fake_cuda_memory(monkeypatch, free=1000, total=1000)
    arrays = [np.zeros(600, np.uint8), np.zeros(10, np.int64)]
    with caplog.at_level(logging.INFO, logger=batches_module.__name__):
        placed = make_resident(arrays, cuda, "segmentation train data")
    assert all(a is b for a, b in zip(placed, arrays, strict=True))  # NumPy: the host path
    assert "do not fit the job's 50 % of the memory" in caplog.text
    assert "pinned host batches" in caplog.text
    assert not Batches(placed[0], placed[0], 4, cuda.device, 8).resident


def test_evaluation_does_not_depend_on_the_batch_size():
    images, _ = blobs(37, 32, 2)
    labels = np.arange(37) % 2
    torch.manual_seed(0)
    model = build_classifier({"backbone": "resnet10t", "pretrained": False}).eval()
    data = Batches(images, labels, 4, CPU, 32)
    args = (model, F.cross_entropy, accuracy_per_sample)
    small = evaluate_all(*args, data.epoch(), CPU)
    large = evaluate_all(*args, data.epoch(None, None, 64), CPU)
    assert small[0] == pytest.approx(large[0], rel=1e-5) and small[1] == large[1]


class TinySetup:
    """A linear classifier on noise for the fit options below."""

    def __init__(self) -> None:
        images, _ = blobs(24, 16, 3)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
        self.data = Batches(images, np.arange(24) % 2, 8, CPU, 16)
        self.loss_fn, self.metric_fn, self.metric_name = F.cross_entropy, accuracy_per_sample, "a"
        self.settings = {"epochs": 5, "lr": 1e-3}

    def train_batches(self, epoch):
        return self.data.epoch(None, epoch_generator(0, epoch))

    def val_batches(self):
        return self.data.epoch()


def test_validate_every_n_epochs(tmp_path):
    result = fit_setup(TinySetup(), tmp_path, epochs=5, val_every=2)
    validated = [not math.isnan(row["val_loss"]) for row in result.history]
    assert validated == [False, True, False, True, True]  # every 2nd epoch and the last
    assert all(
        row["best"] == 0 for row, ok in zip(result.history, validated, strict=True) if not ok
    )
    assert result.best_epoch in (1, 3, 4)


def test_compile_wraps_the_forward_pass_only(monkeypatch, tmp_path):
    compiled = []

    def fake_compile(model, **options):
        compiled.append(model)
        return lambda images: model(images) + 0.0

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = fit_setup(TinySetup(), tmp_path / "plain")
    setup = TinySetup()
    result = fit_setup(setup, tmp_path / "compiled", compile=True)
    assert compiled == [setup.model]
    assert list(result.best_state) == list(plain.best_state)  # no _orig_mod. prefix
    # Evaluation batches are padded to one shape (brainmri.accelerator.CompiledForward): the
    # same losses up to float rounding of the larger matrix product.
    assert [r["val_loss"] for r in result.history] == pytest.approx(
        [r["val_loss"] for r in plain.history], rel=1e-6
    )
