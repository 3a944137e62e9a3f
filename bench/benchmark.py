"""Performance benchmark of the workflow's own code paths (``make bench``).

For one classifier and one segmenter at one image size it measures, in images/s:

* the *limit*: forward + backward + optimizer step (training) and forward (inference) on random
  tensors already on the device, after warm-up, with the job's accelerator plan (precision,
  channels_last, compilation: brainmri.accelerator), and the *fp32 eager* limit (the same
  model in fp32, contiguous, not compiled: what the workflow ran before the plan);
* the *workflow*: :func:`brainmri.training.loop.fit` fed by the workflow's data path
  (:class:`brainmri.training.batches.Batches` over the preprocessed uint8 arrays, batched
  augmentation), set up by :func:`brainmri.training.setup.build_training_setup`, the builder
  the training jobs use, for a fixed number of batches;
  the time of the timed
  epoch is split into data loading, augmentation, step, evaluation and the rest (checkpointing);
* a *naive baseline*: the same model trained by a plain PyTorch loop that reads the PNGs with
  PIL every step and augments per sample with torchvision transforms (DataLoader workers);

and the throughput of LGG preprocessing and of the segmentation metrics. A scaling study runs
the data stage (and optionally the whole demo) through Snakemake for several patient counts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from brainmri.accelerator import AcceleratorPlan, make_plan
from brainmri.config import training_settings
from brainmri.errors import InputError
from brainmri.evaluation.segmentation import distance_metrics, overlap_metrics, per_slice_metrics
from brainmri.io import write_csv
from brainmri.models import check_classifier_config, check_segmenter_config
from brainmri.reporting.provenance import git_commit
from brainmri.tables import load_table
from brainmri.training.batches import Augment
from brainmri.training.evaluate import predict_logits
from brainmri.training.loop import FitSettings, compiled, configure_torch, fit
from brainmri.training.resume import seed_everything
from brainmri.training.setup import (
    TASKS,
    build_task_model,
    build_training_setup,
    folder_loader,
    loss_and_metric,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
LARGE_GPU_BATCH = 128


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class BenchOptions:
    """Knobs of one benchmark run (the CLI's arguments)."""

    classifier: str = "resnet18"
    arch: str = "Unet"
    encoder: str = "resnet18"
    image_size: int | None = None  # None: the data's size, else 128 (CPU) / 256 (CUDA)
    batch_size: int | None = None  # None: 16 (CPU) / 30 (CUDA)
    more_batch_sizes: tuple[int, ...] = ()  # further batch sizes (e.g. a large one on a GPU)
    resident: bool | None = None  # None: as a job chooses; True/False: force the data path
    compile: bool = False  # torch.compile the limit's and the workflow's forward pass
    warmup: int = 3
    batches: int = 8
    repeats: int = 3  # rounds of limit / workflow / naive, medians reported
    threads: int = field(default_factory=available_cores)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    tasks: tuple[str, ...] = TASKS
    naive: bool = True
    config: Path = REPO / "config" / "config.yaml"
    data_dir: Path | None = None
    splits: Path | None = None
    raw_dir: Path | None = None
    patients: int = 12
    slices_per_patient: int = 16
    images_per_class: int = 24
    folds: int = 3
    metric_slices: int = 1024  # about the LGG test set (20% of 3,929 slices)
    clock: str = "wall"  # wall | process (CPU seconds of this process: a shared machine)


# --- machine and timing helpers -------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | None, threads: int) -> dict[str, Any]:
    """CPU model, cores, library versions and the device (None: not chosen), for the header."""
    import segmentation_models_pytorch as smp
    import timm

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": available_cores(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "smp": smp.__version__,
        "device": str(device) if device is not None else "n/a",
        "device_name": "CPU" if device is not None else "each Snakemake job chooses",
    }
    if device is not None and device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


# The clock of the throughput loops: wall time, or (``--clock process``) the CPU seconds of
# this process, which a machine shared with other jobs disturbs far less (use one thread).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_now = time.perf_counter


def use_clock(name: str) -> None:
    global _now
    _now = CLOCKS[name]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Phase:
    """Wall time of one pass over batches and the part spent inside the batch iterator."""

    seconds: float = 0.0  # first batch requested -> iterator exhausted
    data: float = 0.0  # inside the iterator: gather, transfer, uint8 -> float, augmentation
    augment: float = 0.0  # the augmentation part of ``data``
    batches: int = 0
    images: int = 0


def timed(batches: Iterable, phase: Phase, device: torch.device) -> Iterator:
    """Yield from ``batches``, adding the time spent producing each batch to ``phase``."""
    began = _now()
    iterator = iter(batches)
    while True:
        _sync(device)
        start = _now()
        try:
            item = next(iterator)
        except StopIteration:
            break
        _sync(device)
        phase.data += _now() - start
        phase.batches += 1
        phase.images += int(item[0].shape[0])
        yield item
    _sync(device)
    phase.seconds = _now() - began


class TimedAugment:
    """Wraps the workflow's :class:`Augment`; adds its time to the current phase."""

    def __init__(self, augment: Augment, device: torch.device) -> None:
        self.augment, self.device = augment, device
        self.phase = Phase()

    def __call__(self, images, masks, generator, pin=False):
        _sync(self.device)
        start = _now()
        out = self.augment(images, masks, generator, pin)
        _sync(self.device)
        self.phase.augment += _now() - start
        return out


def _per_second(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


# --- data -----------------------------------------------------------------------------------


@dataclass
class DataPaths:
    """A results-like data folder: ``data_dir`` (manifest, arrays, PNGs) and the splits."""

    data_dir: Path
    manifest: Path
    splits: Path
    image_size: int
    source: str
    lgg_raw: Path | None = None
    timings: dict[str, Any] = field(default_factory=dict)


def prepare_synthetic_data(
    root: Path,
    image_size: int,
    patients: int,
    slices_per_patient: int,
    images_per_class: int,
    folds: int,
    seed: int,
    threads: int,
) -> DataPaths:
    """Generate, extract, preprocess and split a synthetic dataset with the workflow's code.

    The LGG preprocessing is timed (slices/s), as is every other step.
    """
    from brainmri.data.archives import ExtractionLimits, extract_archive
    from brainmri.data.preprocess import merge_manifests, preprocess_btm, preprocess_lgg
    from brainmri.data.splits import make_splits
    from brainmri.data.synthetic import write_btm_archive, write_lgg_archive

    raw, data = root / "raw", root / "data"
    timings: dict[str, Any] = {}
    start = time.perf_counter()
    write_lgg_archive(root / "archives" / "lgg.zip", patients, slices_per_patient, seed)
    write_btm_archive(root / "archives" / "btm.zip", images_per_class, seed)
    timings["generate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    extract_archive(root / "archives" / "lgg.zip", raw / "lgg-mri-segmentation", ExtractionLimits())
    extract_archive(
        root / "archives" / "btm.zip", raw / "brain-tumor-mri-dataset", ExtractionLimits()
    )
    timings["extract_s"] = time.perf_counter() - start
    start = time.perf_counter()
    lgg = preprocess_lgg(
        raw / "lgg-mri-segmentation",
        image_size,
        data / "lgg" / "png",
        data / "lgg" / "images.npy",
        data / "lgg" / "masks.npy",
        data / "lgg" / "manifest.csv",
        threads,
    )
    timings["preprocess_lgg_s"] = time.perf_counter() - start
    timings["lgg_slices"] = len(lgg)
    start = time.perf_counter()
    btm = preprocess_btm(
        raw / "brain-tumor-mri-dataset",
        image_size,
        data / "btm" / "png",
        data / "btm" / "images.npy",
        data / "btm" / "manifest.csv",
        threads,
    )
    timings["preprocess_btm_s"] = time.perf_counter() - start
    timings["btm_images"] = len(btm)
    start = time.perf_counter()
    manifest = merge_manifests([data / "lgg" / "manifest.csv", data / "btm" / "manifest.csv"])
    write_csv(data / "manifest.csv", manifest)
    write_csv(root / "splits" / "splits.csv", make_splits(manifest, folds=folds, seed=seed))
    timings["manifest_and_splits_s"] = time.perf_counter() - start
    return DataPaths(
        data,
        data / "manifest.csv",
        root / "splits" / "splits.csv",
        image_size,
        f"synthetic ({patients} patients, {slices_per_patient}+ slices each, "
        f"{images_per_class} images per class of the second dataset)",
        raw / "lgg-mri-segmentation",
        timings,
    )


def existing_data(data_dir: Path, splits: Path | None, raw_dir: Path | None) -> DataPaths:
    """An existing ``results/.../data`` folder (from the workflow's data stage)."""
    manifest = data_dir / "manifest.csv"
    splits = splits or data_dir.parent / "splits" / "splits.csv"
    for path in (manifest, splits, data_dir / "lgg" / "images.npy"):
        if not path.is_file():
            raise InputError(f"{path}: not found (run the workflow's data stage first)")
    size = int(np.load(data_dir / "lgg" / "images.npy", mmap_mode="r").shape[1])
    default_raw = data_dir.parent / "raw" / "lgg-mri-segmentation"
    raw = raw_dir or (default_raw if default_raw.is_dir() else None)
    return DataPaths(data_dir, manifest, splits, size, str(data_dir), raw)


# --- model settings -------------------------------------------------------------------------


def model_settings(
    config_path: Path, task: str, options: BenchOptions, size: int, batch: int
) -> dict[str, Any]:
    """The workflow's training settings (augmentation, lr, ...) of a config file for the
    benchmarked model, at the benchmark's image and batch size, without pretrained weights."""
    if not config_path.is_file():
        raise InputError(f"{config_path}: config file not found")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config = copy.deepcopy(config)
    if task == "classification":
        config[task]["backbones"] = [options.classifier]
        settings = training_settings(config, task, options.classifier)
    else:
        entry = {"name": "bench", "arch": options.arch, "encoder": options.encoder}
        config[task]["architectures"] = [entry]
        settings = training_settings(config, task, "bench")
    # Inference at the training batch so that its ratio compares like with like.
    settings.update(
        input_size=size,
        batch_size=batch,
        eval_batch_size=batch,
        pretrained=False,
        compile=options.compile,
    )
    if task == "classification":
        check_classifier_config(settings, key="--classifier/--image-size")
    else:
        check_segmenter_config(settings, key="--arch/--encoder/--image-size")
    return settings


def model_label(task: str, settings: dict[str, Any]) -> str:
    if task == "classification":
        return settings["backbone"]
    return f"{settings['arch']}/{settings['encoder']}"


def build(task: str, settings: dict[str, Any], seed: int) -> torch.nn.Module:
    """The workflow's model (brainmri.training.setup), freshly initialised from ``seed``."""
    seed_everything(seed)
    return build_task_model(task, settings)


# --- 1. the limit ---------------------------------------------------------------------------


def job_plan(settings: dict[str, Any], device: torch.device) -> AcceleratorPlan:
    """The accelerator plan a training job of ``settings`` gets on ``device``."""
    return make_plan(device, settings, settings["batch_size"])


def fp32_eager_plan(device: torch.device, batch: int) -> AcceleratorPlan:
    """fp32, contiguous, not compiled: the limit of the workflow before the plan."""
    return AcceleratorPlan(device=device, cuda=device.type == "cuda", eval_batch=batch)


def limit_throughput(
    task: str,
    settings: dict[str, Any],
    device: torch.device,
    warmup: int,
    batches: int,
    seed: int,
    plan: AcceleratorPlan | None = None,
) -> dict[str, float]:
    """Training and inference images/s on one random batch that stays on the device, with
    ``plan`` (default: the job's); compiled when the plan compiles (a fresh dynamo cache)."""
    plan = plan or job_plan(settings, device)
    torch._dynamo.reset()
    model = plan.prepare_model(build(task, settings, seed))
    loss_fn, _, _ = loss_and_metric(task, settings)
    batch, size = settings["batch_size"], settings["input_size"]
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator).to(device)
    if task == "classification":
        targets = torch.randint(0, 2, (batch,), generator=generator).to(device)
    else:
        targets = (torch.rand(batch, 1, size, size, generator=generator) > 0.8).float().to(device)
    if plan.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    forward = compiled(model, plan.compile, plan)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with plan.autocast():
            loss = loss_fn(forward(images).float(), targets)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step() -> None:
        with plan.autocast():
            forward(images)

    model.train()
    train_s = _time_loop(train_step, device, warmup, batches)
    model.eval()
    infer_s = _time_loop(infer_step, device, warmup, batches)
    return {
        "train_ips": _per_second(batch * batches, train_s),
        "infer_ips": _per_second(batch * batches, infer_s),
        "train_s": train_s,
        "infer_s": infer_s,
    }


def _time_loop(step: Callable[[], None], device: torch.device, warmup: int, n: int) -> float:
    """Seconds of ``n`` steps after ``warmup``, synchronised around every step as
    :func:`timed` synchronises around every batch of the workflow (the same timing)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = _now()
    for _ in range(n):
        _sync(device)
        step()
        _sync(device)
    return _now() - start


# --- 2./3. the workflow's loops -------------------------------------------------------------


def _cycle(indices: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` of ``indices`` repeated cyclically (small datasets)."""
    if len(indices) == 0:
        raise InputError("no images in the benchmarked split")
    return np.resize(np.asarray(indices), count)


def _task_rows(
    task: str, table: pd.DataFrame, splits: Path
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, val, test) rows as brainmri.training.jobs selects them (segmentation: fold 0 =
    val)."""
    if task == "classification":
        parts = [table[table["cls_split"] == s] for s in ("train", "val", "test")]
    else:
        lgg = table[table["seg_split"] == "train"]
        parts = [lgg[lgg["fold"] != 0], lgg[lgg["fold"] == 0], table[table["seg_split"] == "test"]]
    for name, part in zip(("train", "val", "test"), parts, strict=True):
        if part.empty:
            raise InputError(f"{splits}: the {task} {name} split is empty")
    return parts[0], parts[1], parts[2]


def workflow_throughput(
    task: str,
    settings: dict[str, Any],
    data: DataPaths,
    device: torch.device,
    warmup: int,
    batches: int,
    seed: int,
    resident: bool | None = None,
) -> dict[str, Any]:
    """Run the workflow's ``fit`` for a warm-up epoch and a timed epoch of ``batches`` batches.

    Model, loss and batches come from :func:`brainmri.training.setup.build_training_setup`, the
    builder the training jobs use (``resident``: None lets it choose, as a job does); the
    validation pass of the timed epoch holds as many images, relative to the training
    batches, as the split's validation set holds relative to one training epoch.
    """
    table = load_table(data.manifest, data.splits)
    train, val, test = _task_rows(task, table, data.splits)
    batch = settings["batch_size"]
    seed_everything(seed)
    torch._dynamo.reset()  # the workflow's model compiles into its own cache (not the limit's)
    setup = build_training_setup(
        task, settings, folder_loader(data.data_dir), train, val, device, seed,
        resident=resident, plan=job_plan(settings, device), test=test,
    )  # fmt: skip
    augment = TimedAugment(setup.train_data.augment, device)
    train_data, val_data = setup.train_data, setup.val_data
    train_data.augment = augment
    test_data = setup.batches(test)

    n_batches = {0: warmup, 1: batches}
    train_phases: dict[int, Phase] = {}
    val_phases: list[Phase] = []
    val_count: list[int] = []

    def train_batches(epoch: int) -> Iterator:
        order, generator = setup.epoch_indices(epoch)
        count = n_batches[epoch] * batch
        # Validation images of this epoch: in the proportion val / train-epoch of the split.
        val_count.append(max(batch, round(count * len(val_data) / len(order))))
        train_phases[epoch] = augment.phase = Phase()
        return timed(train_data.epoch(_cycle(order, count), generator), augment.phase, device)

    def val_batches() -> Iterator:
        phase = Phase()
        val_phases.append(phase)
        indices = _cycle(np.arange(len(val_data)), val_count[-1])
        return timed(val_data.epoch(indices), phase, device)

    model = setup.model
    fit_settings = FitSettings.from_settings(settings, seed, setup.metric_name)
    fit_settings.epochs, fit_settings.patience, fit_settings.val_every = 2, None, 1
    fit_settings.warmup_epochs = min(fit_settings.warmup_epochs, 1)  # of the 2 epochs
    with tempfile.TemporaryDirectory(prefix="brainmri-bench-resume-") as resume:
        result = fit(
            model,
            setup.loss_fn,
            setup.metric_fn,
            train_batches,
            val_batches,
            fit_settings,
            device,
            Path(resume),
            "benchmark",
            setup.plan,
        )
    epoch_s = float(result.history[1]["seconds"])
    trained, evaluated = train_phases[1], val_phases[1]
    step_s = trained.seconds - trained.data
    breakdown = {
        "data_load_s": trained.data - trained.augment,
        "augment_s": trained.augment,
        "step_s": step_s,
        "eval_s": evaluated.seconds,
        "other_s": max(0.0, epoch_s - trained.seconds - evaluated.seconds),
        "epoch_s": epoch_s,
        # Share of the training loop spent producing batches (gather, copy, augmentation)
        # rather than in the model's step: the workflow's own overhead, robust to a noisy
        # machine because both parts are timed in the same loop.
        "data_share": trained.data / trained.seconds if trained.seconds > 0 else float("nan"),
    }

    # Inference as predict_logits runs it over the test rows (a warm-up pass, then timed),
    # compiled when the plan compiles (as the limit's inference is).
    infer_count = batches * batch
    forward = compiled(model, setup.plan.compile, setup.plan)
    warm = test_data.epoch(_cycle(np.arange(len(test_data)), warmup * batch))
    predict_logits(forward, warm, device, setup.plan)
    inferred = Phase()
    _sync(device)
    start = _now()
    predict_logits(
        forward,
        timed(test_data.epoch(_cycle(np.arange(len(test_data)), infer_count)), inferred, device),
        device,
        setup.plan,
    )
    _sync(device)
    infer_s = _now() - start
    return {
        "plan": setup.plan.describe(),
        "resident": train_data.resident,
        "eval_batch": setup.eval_batch,
        "train_images": trained.images,
        "val_images": evaluated.images,
        "train_ips": _per_second(trained.images, trained.seconds),
        "epoch_ips": _per_second(trained.images, epoch_s),
        "step_ips": _per_second(trained.images, step_s),
        "eval_ips": _per_second(evaluated.images, evaluated.seconds),
        "infer_ips": _per_second(inferred.images, infer_s),
        "infer_data_s": inferred.data,
        "breakdown": breakdown,
        "split_sizes": {"train": len(train), "val": len(val), "test": len(test)},
    }


# --- 5. the naive baseline ------------------------------------------------------------------


class PngDataset(torch.utils.data.Dataset):
    """The straightforward way: open each image (and mask) PNG with PIL every time it is used,
    then augment that one sample with torchvision transforms."""

    def __init__(
        self,
        data_dir: Path,
        rows: pd.DataFrame,
        task: str,
        transform: Callable,
    ) -> None:
        self.images = [data_dir / path for path in rows["image_path"]]
        self.masks = (
            [data_dir / path for path in rows["mask_path"]] if task != "classification" else None
        )
        self.labels = rows["has_tumor"].to_numpy().astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        with Image.open(self.images[index]) as handle:
            image = tv_tensors.Image(pil_to_tensor(handle.convert("RGB")))
        if self.masks is None:
            return self.transform(image), torch.tensor(self.labels[index])
        with Image.open(self.masks[index]) as handle:
            mask = tv_tensors.Mask(pil_to_tensor(handle.convert("L")) > 127)
        image, mask = self.transform(image, mask)
        return image, mask.float()


def naive_transform(task: str, settings: dict[str, Any], resize_to: int | None) -> Callable:
    """Per-sample torchvision transforms equivalent to the workflow's batched augmentation."""
    from torchvision.transforms import v2

    aug = settings.get("augment") or {}
    shift = float(aug.get("shift_fraction", 0.0))
    steps: list[Any] = [
        v2.RandomAffine(
            degrees=float(aug.get("rotation_deg", 0.0)), translate=(shift, shift) if shift else None
        ),
        v2.RandomHorizontalFlip(0.5 if aug.get("hflip") else 0.0),
        v2.RandomVerticalFlip(0.5 if aug.get("vflip") else 0.0),
    ]
    if resize_to:
        steps.append(v2.Resize((resize_to, resize_to), antialias=True))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if task != "classification" and (aug.get("brightness") or aug.get("contrast")):
        steps.append(v2.ColorJitter(aug.get("brightness", 0.0), aug.get("contrast", 0.0)))
    return v2.Compose(steps)


def naive_throughput(
    task: str,
    settings: dict[str, Any],
    data: DataPaths,
    device: torch.device,
    warmup: int,
    batches: int,
    seed: int,
    workers: int,
) -> dict[str, float]:
    """Images/s of a plain PyTorch loop over PNGs (PIL + torchvision, DataLoader workers).

    Same model, loss, optimizer and precision as the workflow, so the gap is the data path.
    """
    table = load_table(data.manifest, data.splits)
    train, _, _ = _task_rows(task, table, data.splits)
    size, batch = settings["input_size"], settings["batch_size"]
    resize_to = size if data.image_size != size else None
    dataset = PngDataset(data.data_dir, train, task, naive_transform(task, settings, resize_to))
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=(warmup + batches) * batch, generator=generator
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=device.type == "cuda",
    )
    plan = job_plan(settings, device)
    model = plan.prepare_model(build(task, settings, seed))
    loss_fn, _, _ = loss_and_metric(task, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    model.train()
    waited = 0.0
    iterator = iter(loader)
    start = time.perf_counter()
    for index in range(warmup + batches):
        if index == warmup:
            _sync(device)
            start, waited = time.perf_counter(), 0.0
        fetch = time.perf_counter()
        images, targets = next(iterator)
        images, targets = images.to(device), targets.to(device)
        if plan.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        waited += time.perf_counter() - fetch
        optimizer.zero_grad(set_to_none=True)
        with plan.autocast():
            loss = loss_fn(model(images).float(), targets)
        loss.backward()
        optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - start
    del iterator
    return {
        "train_ips": _per_second(batches * batch, seconds),
        "train_s": seconds,
        "data_wait_s": waited,
        "workers": workers,
    }


# --- 4. preprocessing and metrics -----------------------------------------------------------


def preprocess_throughput(raw_dir: Path, image_size: int, threads: int) -> dict[str, Any]:
    """Slices/s of the workflow's LGG preprocessing of ``raw_dir`` (outputs in a temp dir)."""
    from brainmri.data.preprocess import preprocess_lgg

    with tempfile.TemporaryDirectory(prefix="brainmri-bench-pre-") as scratch:
        out = Path(scratch)
        start = time.perf_counter()
        manifest = preprocess_lgg(
            raw_dir,
            image_size,
            out / "png",
            out / "images.npy",
            out / "masks.npy",
            out / "manifest.csv",
            threads,
        )
        seconds = time.perf_counter() - start
    return {
        "slices": len(manifest),
        "seconds": seconds,
        "slices_per_s": _per_second(len(manifest), seconds),
    }


def metric_inputs(masks: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) pairs from real masks: the truth tiled to ``count`` slices and a
    prediction shifted by a few pixels, every 7th one emptied and a small false blob added to
    every 11th one (so every empty-mask case of brainmri.evaluation.segmentation occurs)."""
    truth = np.resize(np.asarray(masks, dtype=bool), (count, *masks.shape[1:]))
    pred = np.roll(truth, shift=(2, -1), axis=(1, 2))
    pred[::7] = False
    pred[3::11, :3, :3] = True
    return pred, truth


def metric_throughput(pred: np.ndarray, truth: np.ndarray, threads: int) -> dict[str, Any]:
    """Slices/s of Dice/Jaccard (vectorised), HD/ASSD (medpy; 1 process and ``threads``), and
    of per_slice_metrics as evaluate_segmenter.py calls it."""
    n = len(truth)
    result: dict[str, Any] = {
        "slices": n,
        "nonempty_pairs": int((pred.any((1, 2)) & truth.any((1, 2))).sum()),
        "threads": threads,
    }
    distance_metrics(pred[:16], truth[:16], 1)  # warm-up: imports, first-call caches
    start = time.perf_counter()
    overlap_metrics(pred, truth)
    result["overlap_s"] = time.perf_counter() - start
    start = time.perf_counter()
    distance_metrics(pred, truth, 1)
    result["distance_1_s"] = time.perf_counter() - start
    start = time.perf_counter()
    distance_metrics(pred, truth, threads)
    result["distance_n_s"] = time.perf_counter() - start
    start = time.perf_counter()
    per_slice_metrics(pred, truth, threads)
    result["per_slice_s"] = time.perf_counter() - start
    for key in ("overlap", "distance_1", "distance_n", "per_slice"):
        result[f"{key}_per_s"] = _per_second(n, result[f"{key}_s"])
    return result


# --- the whole benchmark --------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """auto: the workflow's own choice (a free CUDA GPU, else the CPU)."""
    from brainmri.devices import select_device

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    device = select_device(log)
    if name == "cuda" and device.type != "cuda":
        raise InputError("--device cuda: no CUDA device is available")
    return device


def median_of(values: list[Any]) -> Any:
    """Element-wise median of equally shaped dicts of numbers (other values: the first)."""
    first = values[0]
    if isinstance(first, dict):
        return {key: median_of([value[key] for value in values]) for key in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    return float(np.median(values)) if isinstance(first, float) else int(np.median(values))


def measure_task(
    task: str,
    settings: dict[str, Any],
    data: DataPaths,
    device: torch.device,
    options: BenchOptions,
    naive: bool = True,
) -> dict[str, Any]:
    """``options.repeats`` rounds of limit, workflow (and naive) loops, back to back.

    Each ratio is taken within a round (the loops it compares ran a few seconds apart, so a
    busy neighbour or a clock change hits both) and the median over the rounds is reported,
    with the range; the images/s are medians too. Every round is kept in ``rounds``.
    """
    label = model_label(task, settings)
    rounds = []
    for index in range(options.repeats):
        log.info("%s %s: round %d/%d", task, label, index + 1, options.repeats)
        args = (task, settings, device, options.warmup, options.batches, options.seed)
        fp32 = limit_throughput(*args, fp32_eager_plan(device, settings["batch_size"]))
        limit = limit_throughput(*args)
        flow = workflow_throughput(task, settings, data, *args[2:], options.resident)
        one: dict[str, Any] = {
            "limit_fp32": fp32,
            "limit": limit,
            "workflow": flow,
            "train_ratio": flow["train_ips"] / limit["train_ips"],
            "infer_ratio": flow["infer_ips"] / limit["infer_ips"],
            "train_vs_fp32": flow["train_ips"] / fp32["train_ips"],
            "infer_vs_fp32": flow["infer_ips"] / fp32["infer_ips"],
        }
        if options.naive and naive:
            naive = naive_throughput(task, settings, data, *args[2:], options.threads)
            one["naive"] = naive
            one["speedup_vs_naive"] = flow["train_ips"] / naive["train_ips"]
        rounds.append(one)
    entry = median_of(rounds)
    entry["model"] = label
    for key in ("train_ratio", "infer_ratio", "train_vs_fp32", "infer_vs_fp32", "speedup_vs_naive"):
        if key in entry:
            values = [one[key] for one in rounds]
            entry[key + "_range"] = [min(values), max(values)]
    entry["rounds"] = rounds
    return entry


def run_benchmark(options: BenchOptions, workdir: Path | None = None) -> dict[str, Any]:
    """Every measurement of the benchmark; the report as a JSON-able dict."""
    for name in ("warmup", "batches", "repeats", "threads", "metric_slices"):
        if getattr(options, name) < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: must be positive")
    if any(size < 1 for size in options.more_batch_sizes):
        raise ValueError("--batch-size: must be positive")
    use_clock(options.clock)
    device = resolve_device(options.device)
    cuda = device.type == "cuda"
    configure_torch(device, options.threads)
    batch = options.batch_size or (30 if cuda else 16)
    if cuda and options.batch_size is None and not options.more_batch_sizes:
        # On a GPU the paper's batch leaves most of the card idle: also a large batch.
        options = replace(options, more_batch_sizes=(LARGE_GPU_BATCH,))
    report: dict[str, Any] = {
        "git_commit": git_commit(REPO),  # the code measured (make figures' commit column)
        "machine": machine_info(device, options.threads),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="brainmri-bench-", dir=workdir) as scratch:
        if options.data_dir is not None:
            data = existing_data(options.data_dir, options.splits, options.raw_dir)
            size = options.image_size or data.image_size
        else:
            size = options.image_size or (256 if cuda else 128)
            log.info("Generating and preprocessing a synthetic dataset at %d px", size)
            data = prepare_synthetic_data(
                Path(scratch),
                size,
                options.patients,
                options.slices_per_patient,
                options.images_per_class,
                options.folds,
                options.seed,
                options.threads,
            )
        report["data"] = {
            "source": data.source,
            "array_size": data.image_size,
            "image_size": size,
            "batch_size": batch,
            "timings": data.timings,
        }
        for task in options.tasks:
            settings = model_settings(options.config, task, options, size, batch)
            report["tasks"][task] = measure_task(task, settings, data, device, options)
        for more in options.more_batch_sizes:
            entries = report.setdefault("more_batches", {}).setdefault(str(more), {})
            for task in options.tasks:
                settings = model_settings(options.config, task, options, size, more)
                entries[task] = measure_task(task, settings, data, device, options, naive=False)
                if cuda:
                    torch.cuda.empty_cache()
        report["preprocessing"] = _preprocessing_entry(data, size, options.threads)
        masks = np.load(data.data_dir / "lgg" / "masks.npy", mmap_mode="r")
        log.info("Segmentation metrics on %d slices", options.metric_slices)
        pred, truth = metric_inputs(np.asarray(masks), options.metric_slices)
        report["metrics"] = metric_throughput(pred, truth, options.threads)
    return report


def _preprocessing_entry(data: DataPaths, size: int, threads: int) -> dict[str, Any] | None:
    timings = data.timings
    if "preprocess_lgg_s" in timings and size == data.image_size:
        seconds, slices = timings["preprocess_lgg_s"], timings["lgg_slices"]
        return {
            "raw_dir": "synthetic LGG TIFFs (256 px)",
            "slices": slices,
            "seconds": seconds,
            "slices_per_s": _per_second(slices, seconds),
            "threads": threads,
        }
    if data.lgg_raw is None or not data.lgg_raw.is_dir():
        log.warning("No raw LGG folder (--raw-dir): preprocessing throughput not measured")
        return None
    log.info("Preprocessing %s at %d px", data.lgg_raw, size)
    entry = preprocess_throughput(data.lgg_raw, size, threads)
    return {"raw_dir": str(data.lgg_raw), **entry, "threads": threads}


# --- scaling: the data stage (and the whole demo) through Snakemake -------------------------


def _snakemake_executable() -> str:
    beside = Path(sys.executable).parent / "snakemake"
    found = str(beside) if beside.is_file() else shutil.which("snakemake")
    if not found:
        raise InputError("snakemake: not found beside the Python interpreter or on PATH")
    return found


def _run_snakemake(
    config: Path, cores: int, targets: list[str], log_path: Path, rule_logs: Path
) -> float:
    command = [
        _snakemake_executable(),
        *targets,  # before the options: --resources takes several values
        "--configfile",
        str(config),
        "--cores",
        str(cores),
        "--resources",
        "gpu=1",
    ]
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        # The temp dir goes away: quote the failing jobs' own logs.
        quoted = []
        for path in sorted(rule_logs.rglob("*.log")) if rule_logs.is_dir() else []:
            text = path.read_text(encoding="utf-8", errors="replace")
            if "error" in text.lower():
                quoted.append(f"{path.name}: " + " | ".join(text.strip().splitlines()[-3:]))
        tail = "\n".join(quoted) or "\n".join(log_path.read_text().splitlines()[-20:])
        raise InputError(f"snakemake failed (exit {result.returncode}) with {config}:\n{tail}")
    return seconds


def run_scaling(
    patients: list[int],
    full: bool,
    cores: int,
    base_config: Path,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """Wall time of the data stage (fetch + preprocess + split) per patient count, via Snakemake
    on ``base_config`` (the demo config) into a temp results dir; with ``full`` also the rest of
    the whole workflow in the same results dir."""
    if not base_config.is_file():
        raise InputError(f"{base_config}: config file not found")
    if any(n < 1 for n in patients):
        raise ValueError("--scaling: patient counts must be positive")
    rows = []
    for count in patients:
        with tempfile.TemporaryDirectory(prefix="brainmri-scaling-", dir=workdir) as scratch:
            root = Path(scratch)
            config = yaml.safe_load(base_config.read_text(encoding="utf-8"))
            config["results_dir"] = str(root / "results")
            config["data"].setdefault("synthetic", {})["patients"] = count
            config_path = root / "config.yaml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            results = root / "results"
            targets = [
                str(results / "data" / "manifest.csv"),
                str(results / "splits" / "splits.csv"),
                str(results / "splits" / "summary.tsv"),
            ]
            log.info("Scaling: data stage with %d patients", count)
            row: dict[str, Any] = {"patients": count}
            row["data_s"] = _run_snakemake(
                config_path, cores, targets, root / "snakemake.log", results / "logs"
            )
            manifest = pd.read_csv(results / "data" / "manifest.csv", keep_default_na=False)
            row["lgg_slices"] = int((manifest["source"] == "lgg").sum())
            row["images"] = len(manifest)
            if full:
                log.info("Scaling: the rest of the workflow with %d patients", count)
                row["rest_s"] = _run_snakemake(
                    config_path, cores, [], root / "snakemake.log", results / "logs"
                )
                row["full_s"] = row["data_s"] + row["rest_s"]
            rows.append(row)
    return rows


# --- the report -----------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ratio(entry: dict[str, Any], key: str) -> str:
    """A ratio with its range over the rounds, e.g. ``0.93 (0.91-0.95)``."""
    value = _f(entry.get(key), 2)
    low_high = entry.get(key + "_range")
    if value == "n/a" or not low_high or low_high[0] == low_high[1]:
        return value
    return f"{value} ({_f(low_high[0], 2)}-{_f(low_high[1], 2)})"


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable, "
        f"{machine['threads']} threads used), torch {machine['torch']}, timm {machine['timm']}, "
        f"smp {machine['smp']}, device {machine['device']} ({machine['device_name']})."
    )


def _runs(report: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """(batch size, task, entry) of the main batch size, then of the further ones."""
    runs = [(report["data"]["batch_size"], t, e) for t, e in report["tasks"].items()]
    for batch, tasks in report.get("more_batches", {}).items():
        runs += [(int(batch), task, entry) for task, entry in tasks.items()]
    return runs


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a small Markdown document."""
    lines = ["# Benchmark", ""]
    if "machine" in report:
        lines += [machine_line(report["machine"]), ""]
    if report.get("tasks"):
        options, data = report["options"], report["data"]
        lines += [
            f"Data: {data['source']}; image size {data['image_size']} px, batch size "
            f"{data['batch_size']}, {options['warmup']} warm-up + {options['batches']} timed "
            f"batches per loop, median of {options.get('repeats', 1)} rounds (ratios: median "
            f"(min-max) of the per-round ratios), seed {options['seed']}.",
            "",
            "## Throughput (images/s)",
            "",
            "fp32 eager: the model alone in fp32, contiguous, not compiled (the workflow before "
            "its accelerator plan); limit: the model alone with the plan the workflow runs "
            "(below); workflow / limit: the workflow's own overhead.",
            "",
            "| task | model | batch | data | fp32 eager train | limit train | workflow train | "
            "workflow / fp32 eager | workflow / limit | naive train | workflow / naive | "
            "fp32 eager infer | limit infer | workflow infer | workflow / fp32 eager | "
            "workflow / limit |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | ---: | ---: | ---: |",
        ]
        for batch, task, entry in _runs(report):
            limit, flow, naive = entry["limit"], entry["workflow"], entry.get("naive") or {}
            fp32 = entry.get("limit_fp32") or {}
            where = "device" if flow.get("resident") else "host"
            lines.append(
                f"| {task} | {entry['model']} | {batch} | {where} | "
                f"{_f(fp32.get('train_ips'))} | {_f(limit['train_ips'])} | "
                f"{_f(flow['train_ips'])} | {_ratio(entry, 'train_vs_fp32')} | "
                f"{_ratio(entry, 'train_ratio')} | "
                f"{_f(naive.get('train_ips'))} | {_ratio(entry, 'speedup_vs_naive')} | "
                f"{_f(fp32.get('infer_ips'))} | {_f(limit['infer_ips'])} | "
                f"{_f(flow['infer_ips'])} | {_ratio(entry, 'infer_vs_fp32')} | "
                f"{_ratio(entry, 'infer_ratio')} |"
            )
        plans = {entry["workflow"].get("plan") for _, _, entry in _runs(report)}
        lines += ["", *(f"- {plan}" for plan in sorted(p for p in plans if p))]
        lines += [
            "",
            "## Where the time of the workflow's timed epoch goes (seconds)",
            "",
            "| task | batch | train images | data load | augmentation | step | data path share | "
            "val images | evaluation | other (checkpoint) | epoch | epoch images/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for batch, task, entry in _runs(report):
            flow = entry["workflow"]
            part = flow["breakdown"]
            lines.append(
                f"| {task} | {batch} | {flow['train_images']} | {_f(part['data_load_s'], 3)} | "
                f"{_f(part['augment_s'], 3)} | {_f(part['step_s'], 3)} | "
                f"{_f(100 * part['data_share'])} % | {flow['val_images']} | "
                f"{_f(part['eval_s'], 3)} | {_f(part['other_s'], 3)} | "
                f"{_f(part['epoch_s'], 3)} | {_f(flow['epoch_ips'])} |"
            )
        lines += ["", "## Preprocessing and segmentation metrics", ""]
        lines += ["| stage | items | seconds | items/s |", "| --- | ---: | ---: | ---: |"]
        pre = report.get("preprocessing")
        if pre:
            lines.append(
                f"| LGG preprocessing ({pre['raw_dir']}, {pre['threads']} thread(s)) | "
                f"{pre['slices']} slices | {_f(pre['seconds'], 2)} | {_f(pre['slices_per_s'])} |"
            )
        else:
            lines.append("| LGG preprocessing | not measured (no raw LGG folder) | | |")
        met = report["metrics"]
        n = met["slices"]
        for label, key in (
            ("Dice + Jaccard (vectorised)", "overlap"),
            ("HD + ASSD (medpy, 1 process)", "distance_1"),
            (f"HD + ASSD (medpy, {met['threads']} process(es))", "distance_n"),
            (f"per_slice_metrics (all four, {met['threads']} process(es))", "per_slice"),
        ):
            lines.append(
                f"| {label} | {n} slices | {_f(met[key + '_s'], 3)} | {_f(met[key + '_per_s'])} |"
            )
    if report.get("scaling"):
        full = any("full_s" in row for row in report["scaling"])
        lines += [
            *([""] if lines[-1] else []),
            f"## Scaling: wall time through Snakemake ({report['scaling_cores']} cores)",
            "",
            "| patients | LGG slices | all images | data stage (s) |"
            + (" rest of the demo (s) | whole demo (s) |" if full else ""),
            "| ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if full else ""),
        ]
        for row in report["scaling"]:
            line = f"| {row['patients']} | {row['lgg_slices']} | {row['images']} | "
            line += f"{_f(row['data_s'])} |"
            if full:
                line += f" {_f(row.get('rest_s'))} | {_f(row.get('full_s'))} |"
            lines.append(line)
    return "\n".join(lines) + "\n"
