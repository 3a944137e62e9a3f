"""The accelerator plan (brainmri.accelerator): what it chooses for a device and the settings,
and its compiled forward's bounded recompilations (issue 22 items 5, 6 and 8)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainmri import accelerator
from brainmri.accelerator import AcceleratorPlan, default_eval_batch, make_plan
from brainmri.errors import ConfigError
from brainmri.training.batches import Batches
from brainmri.training.evaluate import accuracy_per_sample
from brainmri.training.loop import FitSettings, epoch_generator, fit

CPU = torch.device("cpu")
GB = 10**9


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINMRI_CPU_BF16", raising=False)
    with_flag, without = tmp_path / "with", tmp_path / "without"
    with_flag.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert accelerator.cpu_native_bf16(with_flag)
    assert not accelerator.cpu_native_bf16(without)
    assert not accelerator.cpu_native_bf16(tmp_path / "missing")
    monkeypatch.setenv("BRAINMRI_CPU_BF16", "0")  # the test suite's setting (conftest)
    assert not accelerator.cpu_native_bf16(with_flag)
    monkeypatch.setenv("BRAINMRI_CPU_BF16", "1")
    assert accelerator.cpu_native_bf16(without)


@pytest.mark.parametrize(
    ("setting", "native", "expected"),
    [
        ("auto", True, "bf16"),
        ("auto", False, "fp32"),
        ("fp32", True, "fp32"),
        ("bf16", True, "bf16"),
    ],
)
def test_cpu_plans(setting, native, expected):
    plan = make_plan(CPU, {"precision": setting, "batch_size": 8}, 8, native_bf16=native)
    assert plan.precision == expected
    assert plan.channels_last == (expected == "bf16")  # fp32 stays contiguous (same results)
    assert not (plan.resident or plan.pin_memory or plan.grad_scaler or plan.cuda)
    assert plan.eval_batch == 8  # the CPU fallback, as before
    assert plan.autocast_dtype == {"bf16": torch.bfloat16}.get(expected)


def test_bf16_is_never_emulated_and_unknown_precisions_are_refused():
    with pytest.raises(ConfigError, match="no native bf16"):
        make_plan(CPU, {"precision": "bf16"}, 8, native_bf16=False)
    with pytest.raises(ConfigError, match="not one of auto, fp32, bf16"):
        make_plan(CPU, {"precision": "fp16"}, 8, native_bf16=True)


def fake_card(monkeypatch, capability: tuple[int, int]) -> None:
    """A CUDA card as torch reports it: is_bf16_supported() is True with emulation (the
    default) on every card, False without on pre-Ampere ones (item 5)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or capability >= (8, 0)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize(("capability", "precision"), [((7, 5), "fp16"), ((8, 0), "bf16")])
def test_pre_ampere_cards_get_fp16_with_a_grad_scaler(monkeypatch, capability, precision):
    fake_card(monkeypatch, capability)
    cuda = torch.device("cuda", 0)
    plan = make_plan(cuda, {"input_size": 256}, 30, total_memory=16 * GB, slots=1)
    assert plan.precision == precision
    assert plan.grad_scaler == (precision == "fp16")
    assert plan.cuda and plan.resident and plan.pin_memory and plan.channels_last
    if precision == "fp16":
        with pytest.raises(ConfigError, match="no native bf16"):
            make_plan(cuda, {"precision": "bf16"}, 30, total_memory=16 * GB, slots=1)


def test_evaluation_batch_follows_input_size_and_job_slots():
    def batch(size, memory, slots):
        return default_eval_batch(size, memory * GB, slots, fallback=30, cuda=True)

    assert default_eval_batch(256, 80 * GB, 1, fallback=30, cuda=False) == 30  # CPU
    assert batch(256, 40, 1) == 256 and batch(256, 16, 1) == 64
    assert batch(256, 80, 1) == 512 and batch(256, 80, 2) == 256 and batch(256, 80, 4) == 128
    assert batch(128, 16, 1) == 256  # a quarter of the pixels: four times the batch
    assert batch(512, 8, 4) == 16  # never below 16
    plan = make_plan(
        torch.device("cuda", 0), {"input_size": 128, "precision": "fp32"}, 30,
        native_bf16=True, total_memory=16 * GB, slots=2,
    )  # fmt: skip
    assert plan.eval_batch == 128 and plan.memory_share == pytest.approx(0.25)
    assert make_plan(CPU, {"eval_batch_size": 7}, 30).eval_batch == 7  # the setting wins


def test_plan_record_and_log_line():
    plan = make_plan(CPU, {"precision": "bf16"}, 16, native_bf16=True)
    record = json.loads(json.dumps(plan.record()))
    assert record["precision"] == "bf16" and record["device"] == "cpu"
    assert record["channels_last"] and not record["grad_scaler"]
    line = plan.describe()
    assert "\n" not in line and "bf16" in line and "channels_last" in line


# --- compilation: one graph per mode whatever the batch sizes (item 8) ----------------------


def compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.conv(images))).mean(dim=(2, 3)))


def test_compiled_fit_compiles_once_per_mode(tmp_path):
    """Training batches of 8 and a last one of 5, validation batches of 6 and a last one of 3,
    three epochs and a prediction pass: one training and one evaluation graph (before: a graph
    for every new batch size and mode, re-made after every resume)."""
    torch._dynamo.reset()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (21, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(21) % 2
    train = Batches(images, labels, 8, CPU, 16)
    val = Batches(images[:15], labels[:15], 6, CPU, 16)
    torch.manual_seed(0)
    model = Net()
    plan = AcceleratorPlan(device=CPU, compile=True, compile_backend="eager", eval_batch=6)
    settings = FitSettings(epochs=3, lr=1e-3, metric_name="accuracy", compile=True)
    before = compiled_frames()
    result = fit(
        model, F.cross_entropy, accuracy_per_sample,
        lambda epoch: train.epoch(np.arange(21), epoch_generator(0, epoch)), val.epoch,
        settings, CPU, tmp_path, "digest", plan,
    )  # fmt: skip
    assert compiled_frames() - before <= 2
    assert len(result.history) == 3
    # The eager model gives the same validation loss (padding the last batch changes nothing).
    torch.manual_seed(0)
    eager = fit(
        Net(), F.cross_entropy, accuracy_per_sample,
        lambda epoch: train.epoch(np.arange(21), epoch_generator(0, epoch)), val.epoch,
        FitSettings(epochs=3, lr=1e-3, metric_name="accuracy"), CPU, tmp_path / "eager",
        "digest", AcceleratorPlan(device=CPU, eval_batch=6),
    )  # fmt: skip
    for ours, theirs in zip(result.history, eager.history, strict=True):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)


def test_compiled_forward_pads_evaluation_batches_to_one_shape():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net().eval()
    forward = accelerator.CompiledForward(model, "eager", eval_batch=8)
    before = compiled_frames()
    with torch.no_grad():
        for count in (8, 3, 5, 1, 8):
            images = torch.rand(count, 3, 16, 16)
            assert torch.allclose(forward(images), model(images), atol=1e-6)
    assert compiled_frames() - before == 1


def test_job_slots_come_from_the_workflow(monkeypatch):
    monkeypatch.setenv("BRAINMRI_JOBS_PER_GPU", "3")
    assert accelerator.job_slots() == 3
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=GB)
    )
    plan = make_plan(torch.device("cuda", 0), {"precision": "fp32"}, 8, native_bf16=False)
    assert plan.job_slots == 3 and plan.memory_share == pytest.approx(0.5 / 3)
