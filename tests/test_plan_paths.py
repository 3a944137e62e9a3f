"""The CUDA plan's code paths run on the CPU (brainmri.accelerator): resident data, pinned
copies, channels_last, bf16/fp16 autocast and the grad scaler against the fp32 host path; the
data path on the ``meta`` device; and issue 22 items 6, 7, 10, 12, 14 and 15."""

from __future__ import annotations

import dataclasses
import fcntl
import json

import numpy as np
import pytest
import torch

from brainmri import devices
from brainmri.accelerator import AcceleratorPlan
from brainmri.errors import InputError
from brainmri.models import build_segmenter
from brainmri.tables import load_table
from brainmri.training import batches as batches_module
from brainmri.training import jobs
from brainmri.training.batches import Augment, Batches, make_resident
from brainmri.training.evaluate import evaluate_all, segmentation_metrics
from brainmri.training.loop import (
    EvaluationOutOfMemory,
    FitSettings,
    epoch_generator,
    fit,
    out_of_memory_message,
)
from brainmri.training.losses import segmentation_loss
from brainmri.training.modality import replace_sequences
from brainmri.training.setup import build_training_setup, folder_loader

CPU = torch.device("cpu")
FP32 = AcceleratorPlan(device=CPU, eval_batch=8)
# The CUDA plan on the CPU: resident data, pinned non-blocking copies (pinning stubbed below).
CUDA_FP32 = dataclasses.replace(FP32, cuda=True, resident=True, pin_memory=True, memory_share=0.5)
PLANS = {
    # name: (plan, relative tolerance of the first epoch's losses against the fp32 host path)
    "resident+pinned": (CUDA_FP32, 0.0),  # the same arithmetic: exactly equal
    # other convolution algorithms, their rounding carried through one epoch of training
    "channels_last": (dataclasses.replace(CUDA_FP32, channels_last=True), 1e-3),
    "bf16+channels_last": (
        dataclasses.replace(CUDA_FP32, precision="bf16", channels_last=True),
        0.05,
    ),
}
SEGMENTER = {
    "name": "unet", "arch": "Unet", "encoder": "resnet18", "pretrained": False,
    "input_size": 32, "epochs": 2, "batch_size": 8, "lr": 1e-3, "dice_smooth": 1.0,
    "train_slices": "tumor_plus_empty", "empty_fraction": 0.5, "modality_dropout": 0.5,
    "augment": {"rotation_deg": 10, "hflip": True, "brightness": 0.1},
}  # fmt: skip


@pytest.fixture
def fake_cuda(monkeypatch):
    """What the CUDA plan calls besides the tensors: free memory, the cache, pinning."""
    pinned = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**12, 10**12))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: pinned.append("empty_cache"))

    def pin(tensor):
        pinned.append(tuple(tensor.shape))
        return tensor

    monkeypatch.setattr(batches_module, "pinned", pin)
    return pinned


def fold_rows(preprocessed_data):
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    lgg = table[table["seg_split"] == "train"]
    return table, lgg[lgg["fold"] != 0], lgg[lgg["fold"] == 0]


def train_with(plan, preprocessed_data, tmp_path, epochs=1):
    _, train, val = fold_rows(preprocessed_data)
    torch.manual_seed(0)
    setup = build_training_setup(
        "segmentation", SEGMENTER, folder_loader(preprocessed_data.data_dir), train, val, CPU,
        7, plan=plan,
    )  # fmt: skip
    settings = FitSettings.from_settings({**SEGMENTER, "epochs": epochs}, 7, "dice")
    result = fit(
        setup.model, setup.loss_fn, setup.metric_fn, setup.train_batches, setup.val_batches,
        settings, CPU, tmp_path / "resume", "digest", setup.plan,
    )  # fmt: skip
    return setup, result


@pytest.fixture(scope="module")
def fp32_reference(preprocessed_data, tmp_path_factory):
    """One epoch of the fp32 host path (the CPU plan of before)."""
    return train_with(FP32, preprocessed_data, tmp_path_factory.mktemp("fp32"))[1]


@pytest.mark.parametrize("name", PLANS)
def test_cuda_plan_paths_train_like_the_fp32_host_path(
    name, fake_cuda, fp32_reference, preprocessed_data, tmp_path
):
    plan, tolerance = PLANS[name]
    reference = fp32_reference
    setup, result = train_with(plan, preprocessed_data, tmp_path / name)
    assert setup.train_data.resident and setup.val_data.resident
    assert any(isinstance(shape, tuple) for shape in fake_cuda)  # pinned copies were made
    if plan.channels_last:
        conv = next(m for m in setup.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    ours, theirs = result.history[0], reference.history[0]
    for key in ("train_loss", "val_loss", "val_dice_all_slices"):
        if tolerance == 0:
            assert ours[key] == theirs[key], key
        else:
            assert ours[key] == pytest.approx(theirs[key], rel=tolerance, abs=tolerance), key
    if tolerance == 0:
        assert all(torch.equal(v, reference.best_state[k]) for k, v in result.best_state.items())


def test_fp16_with_the_grad_scaler_trains_like_fp32(fake_cuda, tmp_path):
    """The pre-Ampere plan (fp16 autocast + GradScaler, item 5) through fit, on the CPU's
    fp16 kernels with a small model: the scaler is on and the losses stay within 5 %."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 16, 16, 3), dtype=np.uint8)
    masks = (rng.random((24, 16, 16)) > 0.7).astype(np.uint8)
    histories = {}
    for plan in (FP32, dataclasses.replace(CUDA_FP32, precision="fp16")):
        data = Batches(*make_resident([images, masks], plan), 8, CPU, 16, None, False, True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 1, 1))  # fmt: skip
        settings = FitSettings(epochs=2, lr=1e-2, metric_name="dice")
        result = fit(
            model, segmentation_loss({"dice_smooth": 1.0}), segmentation_metrics,
            lambda epoch, d=data: d.epoch(None, epoch_generator(0, epoch)), data.epoch,
            settings, CPU, tmp_path / plan.precision, "d", plan,
        )  # fmt: skip
        histories[plan.grad_scaler] = result.history
    assert dataclasses.replace(CUDA_FP32, precision="fp16").scaler().is_enabled()
    for ours, theirs in zip(histories[True], histories[False], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.05)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=0.05)


def test_one_residency_decision_for_train_validation_and_test(
    fake_cuda, monkeypatch, preprocessed_data
):
    """Item 6: the three sets are counted together against the job's share of the card
    (not each against the free memory of its moment), and the test set is placed after the
    training's cached blocks are freed."""
    table, train, val = fold_rows(preprocessed_data)
    test = table[table["seg_split"] == "test"]
    load = folder_loader(preprocessed_data.data_dir)
    per_row = load(train.iloc[:1], "images").nbytes + load(train.iloc[:1], "masks").nbytes
    all_rows = len(train) + len(val) + len(test)
    share = 0.5
    for total, expected in ((2 * per_row * all_rows, True), (2 * per_row * len(train), False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, t=total: (t, t))
        plan = dataclasses.replace(CUDA_FP32, memory_share=share)
        setup = build_training_setup(
            "segmentation", SEGMENTER, load, train, val, CPU, 7, plan=plan, test=test
        )
        assert setup.plan.resident is expected
        assert setup.train_data.resident is expected and setup.val_data.resident is expected
        fake_cuda.clear()
        placed = setup.batches(test)
        assert placed.resident is expected
        assert ("empty_cache" in fake_cuda) is expected


def test_augment_parameters_go_to_the_device_in_one_pinned_copy(fake_cuda):
    """Item 7: one pinned non-blocking host->device copy per batch (before: up to three
    blocking ones); the same augmented images as the plain copy."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((6, 3, 16, 16), dtype=np.float32))
    masks = (images[:, :1] > 0.5).float()
    augment = Augment(rotation_deg=20, shift_fraction=0.1, hflip=True, brightness=0.2, contrast=0.1)
    plain = augment(images, masks, torch.Generator().manual_seed(3))
    fake_cuda.clear()
    pinned = augment(images, masks, torch.Generator().manual_seed(3), pin=True)
    assert fake_cuda == [(7, 6)]  # the seven per-image parameters, pinned once
    assert torch.equal(plain[0], pinned[0]) and torch.equal(plain[1], pinned[1])


def test_the_data_path_and_inference_stay_on_the_device():
    """Batching, resident gathering, augmentation, modality dropout and the model on the
    ``meta`` device, which refuses a tensor of another device as CUDA does."""
    meta = torch.device("meta")
    plan = AcceleratorPlan(device=meta, resident=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 32, 32, 9), dtype=np.uint8)  # 2.5D: 3 slices x 3
    masks = (rng.random((10, 32, 32)) > 0.7).astype(np.uint8)
    placed = make_resident([images, masks], plan)
    assert all(tensor.device == meta for tensor in placed)
    augment = Augment(rotation_deg=15, shift_fraction=0.1, hflip=True, brightness=0.1, contrast=0.1)
    data = Batches(*placed, 4, meta, 32, augment, channels_last=True)
    model = build_segmenter({**SEGMENTER, "slice_context": 1}).to(meta)
    generator = torch.Generator().manual_seed(0)
    for batch, targets in data.epoch(np.arange(10), generator):
        batch = replace_sequences(batch, 1.0, generator)
        assert batch.device == meta and targets.device == meta
        assert model(batch).device == meta
    with pytest.raises(RuntimeError, match="device"):  # the check this test relies on
        torch.zeros(2, device=meta) + torch.zeros(2)


def test_modality_dropout_replaces_the_centre_slice_of_a_2_5d_window():
    """Item 15: with slice_context 1 the channels are slices i-1, i, i+1 (3 each); the drawn
    sequences are replaced in every slice of the window, the centre (channels 3 and 5) too,
    each from its own slice's FLAIR (before: channels 0 and 2 only, of slice i-1)."""
    images = torch.stack([torch.full((4, 4), float(c)) for c in range(9)]).repeat(64, 1, 1, 1)
    out = replace_sequences(images, 1.0, torch.Generator().manual_seed(0))
    changed = (out != images).flatten(2).any(2)  # (B, 9)
    assert changed.any(0)[[3, 5]].all()  # the centre's pre- and post-contrast
    assert not changed[:, [1, 4, 7]].any()  # FLAIR never changes
    for start in (0, 3, 6):  # each slice: the same pattern, from its own FLAIR
        assert torch.equal(changed[:, start], changed[:, 3])
        hit = changed[:, start]
        assert torch.equal(out[hit, start], images[hit, start + 1])
    with pytest.raises(ValueError, match="3 per slice"):
        replace_sequences(torch.zeros(2, 4, 4, 4), 0.5, torch.Generator())


@pytest.mark.parametrize("loss", ["dice", "dice_bce"])
def test_validation_loss_does_not_depend_on_the_evaluation_batch(loss):
    """Item 10: the segmentation loss over the whole validation set (before: the mean of batch
    Dice losses, so select_on: val_loss depended on the card through eval_batch_size)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (37, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((37, 32, 32), np.uint8)
    masks[::3, 8:20, 8:20] = 1  # tumor in a third of the slices, as in the data
    torch.manual_seed(0)
    model = build_segmenter({**SEGMENTER, "slice_context": 0}).eval()
    data = Batches(images, masks, 4, CPU, 32)
    loss_fn = segmentation_loss({"loss": loss, "dice_smooth": 1.0})
    args = (model, loss_fn, segmentation_metrics)
    small = evaluate_all(*args, data.epoch(), CPU, plan=FP32)
    large = evaluate_all(*args, data.epoch(None, None, 64), CPU, plan=FP32)
    assert small[0] == pytest.approx(large[0], rel=1e-7)  # float32 logits of other shapes
    everything, truth = next(data.epoch(None, None, 64))
    with torch.no_grad():
        whole = float(loss_fn(model(everything), truth))
    assert small[0] == pytest.approx(whole, rel=1e-5)  # the loss of one batch of everything
    assert small[1]["dice_all_slices"] == pytest.approx(large[1]["dice_all_slices"])


def test_out_of_memory_names_the_knob_of_where_it_happened(tmp_path):
    """Item 14: validation -> eval_batch_size; a shared GPU -> gpu_jobs_per_device."""
    shared = dataclasses.replace(CUDA_FP32, job_slots=2, eval_batch=256)
    text = out_of_memory_message("segmentation", shared, evaluation=True)
    assert "segmentation.eval_batch_size" in text and "256" in text
    assert "gpu_jobs_per_device: 2" in text
    text = out_of_memory_message("classification", FP32, settings={"batch_size": 30})
    assert "classification.batch_size" in text and "gpu_jobs_per_device" not in text

    def validation():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield  # pragma: no cover

    model = torch.nn.Conv2d(3, 1, 1)
    train = Batches(np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 8, 8), np.uint8), 4, CPU, 8)
    setup = type("Setup", (), {"plan": shared, "settings": {"batch_size": 4}})()
    with (
        pytest.raises(InputError, match=r"segmentation\.eval_batch_size") as raised,
        jobs._oom_hint("segmentation", setup),
    ):
        fit(
                model, segmentation_loss({"dice_smooth": 1.0}), segmentation_metrics,
                lambda epoch: train.epoch(None, epoch_generator(0, epoch)), validation,
                FitSettings(epochs=1, lr=1e-3, metric_name="dice"), CPU, tmp_path, "d", FP32,
            )  # fmt: skip
    assert "gpu_jobs_per_device: 2" in str(raised.value)
    with pytest.raises(EvaluationOutOfMemory):
        fit(
            model, segmentation_loss({"dice_smooth": 1.0}), segmentation_metrics,
            lambda epoch: train.epoch(None, epoch_generator(0, epoch)), validation,
            FitSettings(epochs=1, lr=1e-3, metric_name="dice"), CPU, tmp_path / "b", "d", FP32,
        )  # fmt: skip


def test_segment_and_count_frees_the_gpu_slot_before_the_cpu_metrics(
    monkeypatch, preprocessed_data, tmp_path
):
    """Item 12: the job slot (brainmri.devices' lock) is released once the device work is
    done, before evaluate_segmenter's CPU-only HD/ASSD phase."""
    from brainmri.inference import segment
    from brainmri.models import save_checkpoint

    lock_dir = tmp_path / "locks"

    def claim(log_to=None):
        devices.claim_gpu(1, directory=lock_dir, per_gpu=1)
        return CPU

    monkeypatch.setattr(segment, "select_device", claim)
    settings = {**SEGMENTER, "slice_context": 0, "modality_dropout": 0.0, "input_size": 64}
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_segmenter(settings), "segmentation", settings)
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    rows = table[table["source"] == "lgg"].iloc[:6]
    files = {"lgg": preprocessed_data.lgg_images}
    scored = segment.segment_and_count(
        [checkpoint], rows, files, {"lgg": preprocessed_data.lgg_masks}, 1, 0.5
    )
    assert scored.counts.shape == (6, 3)
    with open(lock_dir / "gpu0.lock", "a+") as handle:  # free again: another job may take it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not devices._held_locks


def test_device_json_carries_the_plan_and_the_report_shows_its_precision(tmp_path):
    from brainmri.reporting.report import training_devices

    job = jobs.TrainJob(
        settings={}, manifest=tmp_path, splits=tmp_path, images={}, masks=None, weights=None,
        seed=0, threads=1, checkpoint=tmp_path / "m" / "model.pt", history=tmp_path / "h.csv",
        device_json=tmp_path / "device.json",
    )  # fmt: skip
    plan = dataclasses.replace(FP32, precision="bf16", channels_last=True)
    jobs._finish(job, CPU, plan)
    record = json.loads((tmp_path / "device.json").read_text())
    assert record["type"] == "cpu" and record["plan"]["precision"] == "bf16"
    assert record["plan"]["channels_last"] and record["plan"]["eval_batch"] == 8
    assert training_devices([tmp_path / "device.json"]) == ["CPU (cpu, bf16)"]


def test_inference_on_the_cuda_plan_equals_the_fp32_host_path(
    fake_cuda, monkeypatch, preprocessed_data, tmp_path
):
    """segment_and_count with the CUDA plan's resident images and masks and pinned batches
    (on the CPU): the same stored probabilities and overlap sums; the slot released."""
    from brainmri.inference import segment
    from brainmri.models import save_checkpoint

    settings = {**SEGMENTER, "slice_context": 0, "modality_dropout": 0.0, "input_size": 64}
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_segmenter(settings), "segmentation", settings)
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    rows = table[table["source"] == "lgg"].iloc[:20]
    args = (
        [checkpoint], rows, {"lgg": preprocessed_data.lgg_images},
        {"lgg": preprocessed_data.lgg_masks}, 1, 0.5,
    )  # fmt: skip
    host = segment.segment_and_count(*args)
    cuda = dataclasses.replace(CUDA_FP32, eval_batch=8)
    monkeypatch.setattr(segment, "default_plan", lambda device, eval_batch=32: cuda)
    monkeypatch.setattr(segment, "inference_plan", lambda device, checkpoint: cuda)
    placed = []
    real = segment.make_resident
    monkeypatch.setattr(
        segment, "make_resident", lambda *a, **k: placed.append(a[2]) or real(*a, **k)
    )
    fake_cuda.clear()
    device = segment.segment_and_count(*args)
    assert placed == ["inference images", "inference masks"]
    assert "empty_cache" in fake_cuda  # released before the CPU phase
    assert np.array_equal(host.stored, device.stored)
    assert np.array_equal(host.counts, device.counts)


def test_configure_torch_sets_the_cuda_flags_of_a_cuda_plan():
    from brainmri.accelerator import configure_torch

    flags = [
        (torch.backends.cudnn, "benchmark"),
        (torch.backends.cuda.matmul, "allow_tf32"),
        (torch.backends.cudnn, "allow_tf32"),
    ]
    saved = [getattr(module, name) for module, name in flags]
    try:
        for module, name in flags:
            setattr(module, name, False)
        configure_torch(CUDA_FP32, torch.get_num_threads())
        assert all(getattr(module, name) for module, name in flags)
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)
