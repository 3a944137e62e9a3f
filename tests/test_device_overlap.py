"""uint8 probabilities and overlap sums made on the inference device give exactly the numbers of
the NumPy reference (quantize, binarize, overlap_counts, evaluate_split) on the CPU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from brainmri.errors import InputError
from brainmri.evaluation.masks import binarize, quantize, stored_cutoff
from brainmri.evaluation.postprocess import PostProcess
from brainmri.evaluation.segmentation import evaluate_split, overlap_counts
from brainmri.inference.overlap import overlap_counts_on
from brainmri.inference.segment import probabilities_of, quantize_on, stored_probabilities
from brainmri.models import build_segmenter, save_checkpoint

CPU = torch.device("cpu")


def test_quantize_on_the_device_rounds_like_numpy():
    rng = np.random.default_rng(0)
    halves = ((np.arange(256) + 0.5) / 255).astype(np.float32)  # ties after x 255
    edges = np.array([0, 1, -0.25, 1.5, 1e-9, 1 - 1e-7, 0.5, 2 / 255], dtype=np.float32)
    values = np.concatenate(
        [
            rng.random(100_000, dtype=np.float32),
            halves,
            np.nextafter(halves, np.float32(0)),
            np.nextafter(halves, np.float32(1)),
            edges,
        ]
    )
    expected = quantize(values)
    assert np.array_equal(quantize_on(torch.from_numpy(values)).numpy(), expected)
    # Ties at x.5 exist among them and go to the even neighbour in both.
    tie = np.float32(2.5 / 255)
    assert quantize(np.array([tie]))[0] == quantize_on(torch.tensor([tie]))[0].item()


@pytest.mark.parametrize("threshold", [1e-6, 0.1, 0.5, 127 / 255, 128 / 255, 0.73, 1 - 1e-6])
def test_stored_cutoff_is_binarize(threshold):
    stored = np.arange(256, dtype=np.uint8)
    cutoff = stored_cutoff(threshold)
    assert 1 <= cutoff <= 255
    assert np.array_equal(binarize(stored, threshold), stored >= cutoff)


@pytest.mark.parametrize("threshold", [0, 1, -0.5, 1.5])
def test_stored_cutoff_refuses_a_threshold_outside_0_1(threshold):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        stored_cutoff(threshold)


def random_case(n: int = 40, size: int = 16, seed: int = 1):
    """Stored probabilities and masks with every empty-mask case among the slices."""
    rng = np.random.default_rng(seed)
    stored = (rng.random((n, size, size)) ** 3 * 256).astype(np.uint8)  # mostly low values
    truth = rng.random((n, size, size)) < 0.2
    stored[:6] = 0  # prediction empty...
    truth[:3] = False  # ... and truth empty too (both empty), or not (pred empty only)
    truth[6:9] = False  # truth empty only
    stored[9:12] = 255  # full prediction
    truth[12] = True  # full truth
    return stored, truth


@pytest.mark.parametrize("torch_sums", [True, False])
@pytest.mark.parametrize("chunk", [3, 256])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_device_overlap_counts_equal_the_numpy_reference(chunk, threshold, torch_sums):
    stored, truth = random_case()
    expected = overlap_counts(binarize(stored, threshold), truth)
    cases = {(p > 0, t > 0) for _, p, t in expected}
    assert len(cases) == 4  # every empty-mask case occurs
    for given in (truth, truth.astype(np.uint8), torch.from_numpy(truth)):
        counts = overlap_counts_on(torch.from_numpy(stored), given, threshold, chunk, torch_sums)
        assert counts.dtype == np.int64 and counts.shape == (len(stored), 3)
        assert np.array_equal(counts, expected)


def test_device_overlap_counts_of_nothing_and_bad_input():
    empty = overlap_counts_on(torch.zeros((0, 4, 4), dtype=torch.uint8), np.zeros((0, 4, 4)), 0.5)
    assert empty.shape == (0, 3)
    with pytest.raises(ValueError, match="uint8"):
        overlap_counts_on(torch.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), 0.5)
    with pytest.raises(ValueError, match="differ"):
        overlap_counts_on(torch.zeros((2, 4, 4), dtype=torch.uint8), np.zeros((3, 4, 4)), 0.5)


def case_rows(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(n)],
            "patient": [f"p{i % 3}" for i in range(n)],
            "slice_index": np.arange(n) // 3,
            "has_tumor": [int(i % 2) for i in range(n)],
            "missing_modalities": ["" if i % 3 else "pre-contrast" for i in range(n)],
        }
    )


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_evaluate_split_with_device_counts_is_identical(threshold):
    stored, truth = random_case(size=24)
    rows = case_rows(len(stored))
    reference, reference_report = evaluate_split(rows, stored, truth, threshold, "test", 1)
    counts = overlap_counts_on(torch.from_numpy(stored), truth, threshold, 7, torch_sums=True)
    frame, report = evaluate_split(rows, stored, truth, threshold, "test", 1, counts=counts)
    pd.testing.assert_frame_equal(frame, reference, check_exact=True)
    assert report == reference_report
    assert frame.to_csv(index=False) == reference.to_csv(index=False)
    assert set(frame["case"]) == {"both_empty", "pred_empty_only", "truth_empty_only"} | {
        "both_nonempty"
    }


def test_evaluate_split_refuses_counts_it_cannot_use():
    stored, truth = random_case()
    rows = case_rows(len(stored))
    counts = overlap_counts(binarize(stored, 0.5), truth)
    with pytest.raises(ValueError, match="post-processing"):
        evaluate_split(rows, stored, truth, 0.5, "test", post=PostProcess(5, False), counts=counts)
    with pytest.raises(ValueError, match="overlap counts of shape"):
        evaluate_split(rows, stored, truth, 0.5, "test", counts=counts[:-1])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three small random segmenters; the last sees 2.5D input (one neighbour each side)."""
    root = tmp_path_factory.mktemp("segmenters")
    paths = []
    for seed, extra in enumerate([{}, {"arch": "DeepLabV3Plus"}, {"slice_context": 1}]):
        settings = {"name": "m", "arch": "Unet", "encoder": "resnet18", "input_size": 32}
        settings = {**settings, "pretrained": False, **extra}
        torch.manual_seed(seed)
        paths.append(root / f"model{seed}.pt")
        save_checkpoint(paths[-1], build_segmenter(settings), "segmentation", settings, epoch=0)
    return paths


@pytest.mark.parametrize("tta", [False, True])
def test_stored_probabilities_are_todays_float_mean_quantized(checkpoints, tta):
    rng = np.random.default_rng(3)
    images = (rng.random((7, 40, 40, 3)) * 255).astype(np.uint8)  # 40 px data, 32 px models
    rows = case_rows(len(images))
    torch.set_num_threads(1)
    singles = [probabilities_of([path], images, CPU, tta, rows)[0] for path in checkpoints]
    for path, single in zip(checkpoints, singles, strict=True):
        stored, _ = stored_probabilities([path], images, CPU, tta, rows)
        assert stored.dtype == torch.uint8 and stored.device == CPU
        assert np.array_equal(stored.numpy(), quantize(single))
    # Several models: the float32 mean as NumPy took it (sum in model order, divided once).
    total = singles[0] + singles[1] + singles[2]
    expected = total / len(checkpoints)
    mean, _ = probabilities_of(checkpoints, images, CPU, tta, rows)
    assert mean.dtype == np.float32 and np.array_equal(mean, expected)
    stored, checkpoint = stored_probabilities(checkpoints, images, CPU, tta, rows)
    assert np.array_equal(stored.numpy(), quantize(expected))
    assert checkpoint["settings"]["slice_context"] == 1  # the last model's
    assert 0 < stored.numpy().min() < stored.numpy().max() < 255  # not a constant


def test_stored_probabilities_need_a_model():
    with pytest.raises(InputError, match="no segmentation model"):
        stored_probabilities([], np.zeros((2, 8, 8, 3), dtype=np.uint8), CPU)
