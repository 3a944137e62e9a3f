"""The accelerator plan: every speed-related choice of one job, decided once from the device and
the settings, logged in one line and written to the job's ``device.json``.

The training loop, the batches, evaluation and inference read the plan and never ask the device
themselves (no ``device.type == "cuda"`` or ``is_bf16_supported()`` elsewhere), so the CUDA
plan's code runs on the CPU in the tests (``make_plan(..., cuda=True)`` on a CPU device).

Precision (``precision`` in a stage's settings: ``auto`` | ``fp32`` | ``bf16``):

* CUDA: bf16 autocast where the card computes bf16 natively (compute capability >= 8.0,
  ``torch.cuda.is_bf16_supported(including_emulation=False)``), else fp16 autocast with a
  GradScaler (T4, V100: emulated bf16 is slow or fails in cuDNN).
* CPU: bf16 autocast where the CPU has native bf16 (``avx512_bf16`` or ``amx_bf16`` in
  /proc/cpuinfo), never emulated; with it channels_last. Elsewhere, or with ``fp32``, the fp32
  path of before: no autocast, contiguous tensors, deterministic algorithms, byte for byte the
  same results. ``BRAINMRI_CPU_BF16=0`` (the test suite sets it) makes ``auto`` treat the CPU as
  one without native bf16, so that results pinned by tests do not depend on the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from brainmri.devices import release_gpus
from brainmri.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Inference batch on CUDA: half of a job slot's share of the card for activations, at about
# 1 KiB per input pixel (U-Net/ResNet34 at 256 px in bf16: 64 MiB per image), a power of two.
EVAL_MEMORY_FRACTION = 0.5
EVAL_BYTES_PER_PIXEL = 1024
EVAL_BATCH_RANGE = (16, 1024)


def cpu_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), from its flags.

    ``BRAINMRI_CPU_BF16`` = 0 / 1 overrides the detection (tests, or flags a VM hides)."""
    forced = os.environ.get("BRAINMRI_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in CPU_BF16_FLAGS)
    return False


def cuda_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (Ampere, compute capability 8.0, and later), not emulated."""
    major, _ = torch.cuda.get_device_capability(device)
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        native = True
    return major >= 8 and native


@dataclass(frozen=True)
class AcceleratorPlan:
    """How one job uses its device (:func:`make_plan`; tests build CUDA plans on the CPU)."""

    device: torch.device
    cuda: bool = False  # the CUDA code paths (resident data, pinned copies, cuDNN flags)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast dtype; fp16 with a GradScaler)
    channels_last: bool = False
    resident: bool = False  # a job's uint8 arrays on the device (when they fit, see setup)
    pin_memory: bool = False  # host batches pinned before a non_blocking copy
    compile: bool = False  # torch.compile the forward pass
    compile_backend: str = "inductor"
    eval_batch: int = 32
    memory_share: float = 0.0  # share of the device's memory one job slot may fill with data
    job_slots: int = 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def grad_scaler(self) -> bool:
        return self.precision == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the plan's dtype (nothing in fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """The grad scaler (enabled with fp16) for the plan's device type."""
        return torch.amp.GradScaler(self.device.type, enabled=self.grad_scaler)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device, channels_last where planned."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def record(self) -> dict[str, Any]:
        """The plan as JSON types (for ``device.json``)."""
        values = asdict(self)
        values["device"] = str(self.device)
        values["grad_scaler"] = self.grad_scaler
        return values

    def describe(self) -> str:
        """One log line."""
        parts = [
            f"{self.precision}{' + GradScaler' if self.grad_scaler else ''}",
            "channels_last" if self.channels_last else "contiguous",
            "resident data" if self.resident else "host batches",
        ]
        if self.pin_memory:
            parts.append("pinned")
        parts.append("torch.compile" if self.compile else "eager")
        parts.append(f"eval batch {self.eval_batch}")
        if self.cuda:
            parts.append(f"{self.memory_share:.0%} of the memory per job ({self.job_slots} slots)")
        return f"Plan on {self.device}: " + ", ".join(parts)


def choose_precision(setting: str, cuda: bool, native_bf16: bool, where: str) -> str:
    """fp32 | bf16 | fp16 from the ``precision`` setting and what the device does natively."""
    if setting not in PRECISIONS:
        raise ConfigError(f"precision: {setting!r} is not one of {', '.join(PRECISIONS)}")
    if setting == "fp32":
        return "fp32"
    if native_bf16:
        return "bf16"
    if setting == "bf16":
        raise ConfigError(
            f"precision: bf16, but {where} has no native bf16 (it would be emulated): "
            "use auto or fp32"
        )
    return "fp16" if cuda else "fp32"


def default_eval_batch(
    input_size: int, total_memory: int, job_slots: int, fallback: int, cuda: bool
) -> int:
    """The evaluation batch when ``eval_batch_size`` is null: ``fallback`` on the CPU (the
    results of before); on CUDA the largest power of two whose activations fit half of one job
    slot's share of the card at :data:`EVAL_BYTES_PER_PIXEL` per input pixel."""
    if not cuda:
        return fallback
    budget = EVAL_MEMORY_FRACTION * total_memory / max(1, job_slots)
    fits = int(budget // (EVAL_BYTES_PER_PIXEL * input_size * input_size))
    low, high = EVAL_BATCH_RANGE
    batch = low
    while batch * 2 <= min(fits, high):
        batch *= 2
    return batch


def job_slots() -> int:
    """Jobs sharing one GPU (``$BRAINMRI_JOBS_PER_GPU``, set from ``gpu_jobs_per_device``)."""
    try:
        return max(1, int(os.environ.get("BRAINMRI_JOBS_PER_GPU", "1")))
    except ValueError:
        return 1


def make_plan(
    device: torch.device,
    settings: dict[str, Any],
    eval_fallback: int,
    *,
    cuda: bool | None = None,
    native_bf16: bool | None = None,
    total_memory: int | None = None,
    slots: int | None = None,
) -> AcceleratorPlan:
    """The plan of a job on ``device`` with a stage's ``settings``.

    ``eval_fallback``: the CPU evaluation batch (the training batch for validation, 32 for
    segmentation inference). The keyword arguments stand in for what the device reports
    (tests: a CUDA plan, a pre-Ampere card, on the CPU)."""
    cuda = device.type == "cuda" if cuda is None else cuda
    slots = job_slots() if slots is None else slots
    if native_bf16 is None:
        native_bf16 = cuda_native_bf16(device) if cuda else cpu_native_bf16()
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    where = "this GPU" if cuda else "this CPU"
    precision = choose_precision(settings.get("precision", "auto"), cuda, native_bf16, where)
    eval_batch = settings.get("eval_batch_size") or default_eval_batch(
        settings.get("input_size", 256), total_memory, slots, eval_fallback, cuda
    )
    return AcceleratorPlan(
        device=device,
        cuda=cuda,
        precision=precision,
        # On the CPU channels_last only with bf16 (oneDNN's fast path); in fp32 it would change
        # the convolution algorithms, and with them the results of before.
        channels_last=cuda or precision == "bf16",
        resident=cuda,
        pin_memory=cuda,
        compile=bool(settings.get("compile", False)),
        eval_batch=int(eval_batch),
        memory_share=settings.get("resident_share", 0.5) / slots if cuda else 0.0,
        job_slots=slots,
    )


def default_plan(device: torch.device, eval_batch: int = 32) -> AcceleratorPlan:
    """The plan of default settings (``precision: auto``) on ``device``: what the low-level
    functions (fit, evaluate_all, ...) use when their caller passes none."""
    return make_plan(device, {}, eval_batch)


class CompiledForward(torch.nn.Module):
    """``torch.compile`` of a model's forward with a bounded number of graphs: training
    batches have their batch dimension marked dynamic (the last, smaller batch reuses the
    graph), evaluation batches (no gradients) are zero-padded to ``eval_batch`` (one static
    graph; in eval mode each image's output depends on that image only) and cut back. So a
    job compiles one graph per mode, whatever its batch sizes (tests/test_accelerator.py)."""

    def __init__(self, model: torch.nn.Module, backend: str, eval_batch: int) -> None:
        super().__init__()
        self.model = model  # a submodule: train()/eval() of the wrapper reach the model
        self.compiled = torch.compile(model, backend=backend)
        self.eval_batch = eval_batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if torch.is_grad_enabled() or count > self.eval_batch:
            torch._dynamo.maybe_mark_dynamic(images, 0)
            return self.compiled(images)
        if count < self.eval_batch:
            padding = images.new_zeros((self.eval_batch - count, *images.shape[1:]))
            images = torch.cat([images, padding]).contiguous(
                memory_format=torch.channels_last
                if images.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format
            )
        return self.compiled(images)[:count]


def release_device(plan: AcceleratorPlan) -> None:
    """Give the device back before a CPU-only phase: the cached blocks (CUDA) and the job slot
    this process claimed (brainmri.devices), so that another GPU job can start meanwhile."""
    if plan.cuda:
        torch.cuda.empty_cache()
    release_gpus()
    log.info("Device %s released (the rest runs on the CPU)", plan.device)


def configure_torch(plan: AcceleratorPlan | torch.device, threads: int) -> None:
    """Threads; deterministic algorithms on the CPU; cuDNN benchmark and TF32 on CUDA (a
    device: as its :func:`default_plan` says). The job logs its plan once it is complete."""
    if isinstance(plan, torch.device):
        plan = default_plan(plan)
    torch.set_num_threads(max(1, threads))
    if plan.cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log.info("Threads: %d; cudnn.benchmark (not bit-reproducible)", torch.get_num_threads())
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.info("Threads: %d; CPU: deterministic algorithms", torch.get_num_threads())
