"""The GPU checks (``pytest -m gpu``; bench/gpu_check.sh runs them first, in under a minute).

On a CUDA card: the fp32 forward pass and one fp32 epoch equal the CPU's within a stated
tolerance; the bf16 and fp16 training paths run (fp16 with its grad scaler); the batches of the
device-resident path equal the CPU's; one training epoch makes no synchronising CUDA call per
batch (``torch.cuda.set_sync_debug_mode("error")``); ``torch.compile`` compiles a bounded number
of graphs over training, last-batch and evaluation sizes; the card gets the precision it
computes natively. Without CUDA every test here is skipped. ``BRAINMRI_GPU_TESTS_ON_CPU=1`` runs
them on the CPU instead (the CUDA-only assertions skipped): a dry run of this module's own code.

The places that read the accelerator plan (issue 22, ``brainmri.accelerator``) are the helpers
under "PLAN" below; everything else goes through the workflow's own functions.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import test_gpu_paths
import torch
import torch.nn.functional as F

from brainmri.models import build_classifier, build_segmenter
from brainmri.tables import load_table
from brainmri.training import evaluate as evaluate_module
from brainmri.training import loop
from brainmri.training.batches import Augment, Batches, make_resident
from brainmri.training.loop import FitSettings, configure_torch, epoch_generator, fit
from brainmri.training.setup import build_training_setup, folder_loader

DRY = os.environ.get("BRAINMRI_GPU_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or DRY), reason="needs a CUDA device"),
]
CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(DRY, reason="a CUDA assertion (dry run on the CPU)")

SETTINGS = test_gpu_paths.SETTINGS  # the same tiny models as the CPU plan-path tests
# Stated tolerances: fp32 on CUDA (TF32 off) against the CPU. The forward pass differs by
# summation order only; an epoch of Adam steps amplifies that (cuDNN picks other algorithms).
FORWARD_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
EPOCH_LOSS_RTOL = 2e-2
MIXED_LOSS_RTOL = 0.1  # bf16 / fp16 autocast against fp32, on the first epoch's losses


@pytest.fixture(scope="module")
def device() -> torch.device:
    return CPU if DRY else torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def torch_flags():
    """The global flags configure_torch sets (per job process in the workflow), restored."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_num_threads(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3:5]
    torch.set_num_threads(saved[5])


def no_tf32() -> None:
    """Exact fp32 matrix products and convolutions (the workflow allows TF32 for speed)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def exact_fp32():
    no_tf32()


# --- PLAN: the accelerator plan's places ------------------------------------------------------
# Written for both sides of the merge of branch accel (brainmri.accelerator): with the plan,
# the job's plan says the precision, residency and pinning; before it, the loop asked the device
# (bf16 autocast where torch.cuda.is_bf16_supported(), else fp16 with a GradScaler) and the
# precision is forced by patching that question. Once merged, the fallbacks can go.
try:
    from brainmri.accelerator import AcceleratorPlan, make_plan
except ImportError:  # before the plan
    AcceleratorPlan = make_plan = None


def card_precision() -> str:
    """The autocast precision the workflow picks on this card: bf16 or fp16."""
    if make_plan is not None:
        return make_plan(torch.device("cuda", 0), {}, 32).precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def job_plan(device: torch.device, precision: str, settings: dict | None = None, batch: int = 32):
    """The plan of a job in ``precision`` (fp32 | bf16 | fp16; the CPU: fp32); None before
    the plan."""
    if make_plan is None:
        return None
    if device.type != "cuda":
        precision = "fp32"
    if precision == "fp16":  # what a pre-Ampere card gets
        return make_plan(
            device, {**(settings or {}), "precision": "auto"}, batch, native_bf16=False
        )
    return make_plan(device, {**(settings or {}), "precision": precision}, batch)


def plan_arguments(plan) -> dict:
    return {} if plan is None else {"plan": plan}


def resident(arrays: list[np.ndarray], device: torch.device) -> list:
    """The arrays on ``device`` (the device-resident path), whatever the free memory."""
    if AcceleratorPlan is None:
        return make_resident(arrays, device, 1.0)
    cuda = device.type == "cuda"
    return make_resident(arrays, AcceleratorPlan(device=device, cuda=cuda, memory_share=1.0))


def host_batches(images, targets, batch: int, device: torch.device, size: int, augment=None):
    """The host path: batches gathered on the host, pinned and copied on CUDA."""
    if AcceleratorPlan is None:
        return Batches(images, targets, batch, device, size, augment)
    return Batches(images, targets, batch, device, size, augment, pin=device.type == "cuda")


@contextlib.contextmanager
def forced_precision(precision: str):
    """Before the plan: the loop's training and evaluation in ``precision`` on this card (with
    the plan, the plan passed says it, and this does nothing)."""
    with pytest.MonkeyPatch.context() as patch:
        if make_plan is not None:
            pass
        elif precision == "fp32":
            patch.setattr(loop, "autocast", lambda device: contextlib.nullcontext())
            patch.setattr(evaluate_module, "autocast", lambda device: contextlib.nullcontext())
            patch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # no scaler
        else:
            patch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: precision == "bf16")
        yield


def evaluate(model, batches, device: torch.device, precision: str = "fp32"):
    """evaluate_all of a classifier (cross-entropy, accuracy) in ``precision``."""
    plan = job_plan(device, precision)
    args = (F.cross_entropy, evaluate_module.accuracy_per_sample, batches, device, None, "metric")
    with forced_precision(precision):
        return evaluate_module.evaluate_all(model, *args, **plan_arguments(plan))


def make_setup(
    preprocessed_data, task: str, device: torch.device, resident: bool, precision: str = "fp32",
    **settings,
):  # fmt: skip
    """A job's training setup (model, batches; with the plan, its plan) in ``precision``."""
    train_rows, val_rows = splits(preprocessed_data, task)
    settings = {**SETTINGS[task], **settings}
    plan = job_plan(device, precision, settings, settings["batch_size"])
    torch.manual_seed(0)  # the same initial weights on every device
    setup = build_training_setup(
        task, settings, folder_loader(preprocessed_data.data_dir), train_rows, val_rows, device,
        7, resident=resident, **plan_arguments(plan),
    )  # fmt: skip
    setup.precision = precision  # before the plan: forced around fit (train)
    return setup


def train(setup, device: torch.device, resume: Path, exact: bool = False, **options):
    """One job's fit (``FitSettings`` fields in ``options``) in the setup's precision;
    ``exact``: fp32 without TF32."""
    # As in a job's process, which configures only its own device: no deterministic mode left
    # over from a CPU reference run on CUDA.
    torch.use_deterministic_algorithms(False)
    configure_torch(device, min(8, os.cpu_count() or 1))
    if exact:
        no_tf32()
    settings = FitSettings.from_settings(setup.settings, 7, setup.metric_name)
    for key, value in options.items():
        setattr(settings, key, value)
    with forced_precision(setup.precision):
        return fit(
            setup.model, setup.loss_fn, setup.metric_fn, setup.train_batches,
            setup.val_batches, settings, device, resume, "digest",
            **plan_arguments(getattr(setup, "plan", None)),
        )  # fmt: skip


# --- END PLAN ------------------------------------------------------------------------------


def splits(preprocessed_data, task: str):
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    if task == "classification":
        return table[table["cls_split"] == "train"], table[table["cls_split"] == "val"]
    lgg = table[table["seg_split"] == "train"]
    return lgg[lgg["fold"] != 0], lgg[lgg["fold"] == 0]


@cuda_only
def test_the_card_gets_the_precision_it_computes_natively(device):
    """bf16 on compute capability >= 8.0 (Ampere and later), else fp16 with a grad scaler (T4,
    V100: their bf16 is emulated, slow or failing in cuDNN)."""
    major, minor = torch.cuda.get_device_capability(device)
    expected = "bf16" if major >= 8 else "fp16"
    print(f"{torch.cuda.get_device_name(device)}: sm_{major}{minor}, {card_precision()}")
    assert card_precision() == expected
    model = build_classifier({"backbone": "resnet10t", "pretrained": False}).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]
    with torch.autocast("cuda", dtype=dtype):
        logits = model(torch.rand(2, 3, 64, 64, device=device))
    assert logits.dtype == dtype
    logits.float().sum().backward()  # the backward pass runs in it as well


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_fp32_forward_matches_the_cpu(task, device, exact_fp32):
    torch.manual_seed(0)
    if task == "classification":
        model = build_classifier({"backbone": "resnet10t", "pretrained": False})
    else:
        model = build_segmenter({"arch": "Unet", "encoder": "resnet18", "pretrained": False})
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(images)
        model.to(device, memory_format=torch.channels_last)
        got = model(images.to(device).contiguous(memory_format=torch.channels_last)).cpu()
    torch.testing.assert_close(got, expected, **FORWARD_TOLERANCE)


def test_resident_batches_match_the_cpu_host_batches(device):
    """The same augmented batches from the CPU host path, the CUDA host path (pinned copies)
    and the CUDA-resident path: equal on the device, within float rounding of the CPU."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (21, 32, 32, 3), dtype=np.uint8)
    masks = (rng.random((21, 32, 32)) > 0.7).astype(np.uint8)
    augment = Augment(rotation_deg=20, shift_fraction=0.1, hflip=True, vflip=True, brightness=0.2)
    order = np.random.default_rng(1).permutation(21)
    paths = {
        "cpu": Batches(images, masks, 8, CPU, 32, augment),
        "host": host_batches(images, masks, 8, device, 32, augment),
        "resident": Batches(*resident([images, masks], device), 8, device, 32, augment),
    }
    assert paths["resident"].resident and not paths["host"].resident
    batches = {name: list(data.epoch(order, epoch_generator(0, 3))) for name, data in paths.items()}
    for (cpu_x, cpu_y), (host_x, host_y), (res_x, res_y) in zip(*batches.values(), strict=True):
        assert torch.equal(host_x, res_x) and torch.equal(host_y, res_y)
        torch.testing.assert_close(res_x.cpu(), cpu_x, rtol=0, atol=1e-5)
        # Nearest-neighbour masks may round a sample point lying on a pixel edge the other way.
        assert (res_y.cpu() != cpu_y).float().mean() < 1e-2


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_an_fp32_epoch_matches_the_cpu(task, device, preprocessed_data, tmp_path):
    cpu_setup = make_setup(preprocessed_data, task, CPU, False)
    cpu = train(cpu_setup, CPU, tmp_path / "cpu", epochs=1)
    setup = make_setup(preprocessed_data, task, device, True)
    got = train(setup, device, tmp_path / "gpu", exact=True, epochs=1)
    for column in ("train_loss", "val_loss"):
        assert got.history[0][column] == pytest.approx(cpu.history[0][column], rel=EPOCH_LOSS_RTOL)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision, device, preprocessed_data, tmp_path):
    """Autocast bf16 (where the card has it) or fp16 with the grad scaler: one epoch runs and
    its losses are those of fp32 within the stated tolerance."""
    if precision == "bf16" and device.type == "cuda" and card_precision() != "bf16":
        pytest.skip("no native bf16 on this card")
    task = "segmentation"
    reference = train(
        make_setup(preprocessed_data, task, device, True), device, tmp_path / "fp32", epochs=1
    )
    setup = make_setup(preprocessed_data, task, device, True, precision)
    got = train(setup, device, tmp_path / precision, epochs=1)
    row, expected = got.history[0], reference.history[0]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    assert row["val_loss"] == pytest.approx(expected["val_loss"], rel=MIXED_LOSS_RTOL)
    scaler = torch.load(tmp_path / precision / "state.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (precision == "fp16" and device.type == "cuda")  # scaler on: fp16


class StrictBatches:
    """Training batches whose epochs >= 1 run with synchronising CUDA calls made errors, from
    the first batch to the end of the last batch's optimizer step (epoch 0 warms up: cuDNN
    benchmark, allocator); the end of the epoch (its means, validation, state) is not checked."""

    def __init__(self, batches) -> None:
        self.batches, self.checked = batches, 0

    def __call__(self, epoch: int):
        iterator = self.batches(epoch)
        if epoch < 1 or DRY:
            yield from iterator
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in iterator:
                self.checked += 1
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_training_epoch_makes_no_per_batch_synchronisation(
    task, device, preprocessed_data, tmp_path
):
    """Device-resident data, augmentation, the card's precision: a synchronising call inside
    the batch loop (``.item()``, a blocking host copy, ``nonzero``) raises here, named in the
    error. On an fp16 card the GradScaler's found-inf check would be one (unless the optimizer
    handles it on the device)."""
    precision = card_precision() if device.type == "cuda" else "fp32"
    setup = make_setup(preprocessed_data, task, device, True, precision)
    strict = StrictBatches(setup.train_batches)
    setup.train_batches = strict
    result = train(setup, device, tmp_path / "resume", epochs=2, val_every=2)
    assert len(result.history) == 2
    assert strict.checked >= (0 if DRY else 2)  # several batches ran under the check


def count_graphs(monkeypatch):
    """Make torch.compile count the graphs it compiles (the eager backend: no code generation,
    the same guards and recompilations)."""
    from torch._dynamo.testing import CompileCounter

    counter, real = CompileCounter(), torch.compile

    def counting(model, *args, **kwargs):
        kwargs["backend"] = counter
        return real(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    torch._dynamo.reset()
    return counter


# One graph for training batches (the last, smaller one included) and one for evaluation
# batches (issue 22 item 8: the plan's compiled forward; before it, 3-5 per job).
MAX_GRAPHS = 2


def test_compile_recompilations_are_bounded(device, preprocessed_data, tmp_path, monkeypatch):
    """Training batches of 8 and a smaller last one, evaluation batches of 16 and a smaller
    last one, two epochs: at most MAX_GRAPHS graphs."""
    counter = count_graphs(monkeypatch)
    precision = card_precision() if device.type == "cuda" else "fp32"
    setup = make_setup(
        preprocessed_data, "classification", device, True, precision, eval_batch_size=16
    )
    assert len(setup.train_data) % 8 and len(setup.val_data) % 16  # partial last batches
    train(setup, device, tmp_path / "resume", epochs=2, compile=True)
    print(f"torch.compile: {counter.frame_count} graphs, {counter.op_count} ops")
    assert 1 <= counter.frame_count <= MAX_GRAPHS


def test_evaluation_on_the_device_matches_the_cpu(device, exact_fp32):
    """The validation loss and metric of the device path (resident batches, sums on the
    device) are the CPU's within the forward tolerance."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (37, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(37) % 2
    torch.manual_seed(0)
    model = build_classifier({"backbone": "resnet10t", "pretrained": False}).eval()
    expected = evaluate(model, Batches(images, labels, 8, CPU, 32).epoch(), CPU)
    model.to(device)
    data = Batches(*resident([images, labels], device), 8, device, 32)
    got = evaluate(model, data.epoch(), device)
    assert got[0] == pytest.approx(expected[0], rel=FORWARD_TOLERANCE["rtol"])
    assert got[1] == pytest.approx(expected[1], abs=1 / 37)  # at most one tie flipped
