"""Segmentation metrics against values computed by hand, including every empty-mask case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainmri.metrics import overlap_metrics, per_slice_metrics, summarize_slices, volume_dice


def square(top: int, left: int, size: int = 3, shape: int = 8) -> np.ndarray:
    mask = np.zeros((shape, shape), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_shifted_squares_by_hand():
    truth = square(2, 2)  # 9 pixels
    pred = square(2, 3)  # shifted right by one pixel: 6 pixels overlap
    frame = per_slice_metrics(pred[None], truth[None])
    row = frame.iloc[0]
    assert row["dice"] == pytest.approx(2 * 6 / 18)
    assert row["jaccard"] == pytest.approx(6 / 12)
    # Hausdorff: the farthest boundary pixel of one mask from the other is 1 px away.
    assert row["hd"] == pytest.approx(1.0)
    # ASSD: a surface is the 8 border pixels of a 3x3 square (all but the centre). Of pred's
    # border (columns 3-5), the 3 pixels of column 5 are 1 px from truth's border, and so is
    # (3, 3), which is truth's centre, not its border; the other 4 lie on truth's border:
    # 4 / 8 = 0.5, the same from truth to pred by symmetry -> ASSD 0.5.
    assert row["assd"] == pytest.approx(0.5)
    assert row["case"] == "both_nonempty"
    assert (row["pred_area"], row["true_area"]) == (9, 9)


def test_identical_masks():
    mask = square(1, 1, 4)
    row = per_slice_metrics(mask[None], mask[None]).iloc[0]
    assert (row["dice"], row["jaccard"], row["hd"], row["assd"]) == (1.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("pred_empty", "truth_empty", "case", "dice", "distance"),
    [
        (True, True, "both_empty", 1.0, 0.0),
        (True, False, "pred_empty_only", 0.0, math.hypot(8, 8)),
        (False, True, "truth_empty_only", 0.0, math.hypot(8, 8)),
    ],
)
def test_empty_mask_rules(pred_empty, truth_empty, case, dice, distance):
    empty = np.zeros((8, 8), dtype=bool)
    pred = empty if pred_empty else square(2, 2)
    truth = empty if truth_empty else square(3, 3)
    row = per_slice_metrics(pred[None], truth[None]).iloc[0]
    assert row["case"] == case
    assert row["dice"] == dice and row["jaccard"] == dice
    assert row["hd"] == pytest.approx(distance) and row["assd"] == pytest.approx(distance)


def test_case_counts_and_summary():
    empty = np.zeros((8, 8), dtype=bool)
    pred = np.stack([empty, empty, square(1, 1), square(1, 1)])
    truth = np.stack([empty, square(1, 1), empty, square(1, 1)])
    frame = per_slice_metrics(pred, truth)
    summary = summarize_slices(frame)
    assert summary["cases"] == {
        "both_empty": 1,
        "pred_empty_only": 1,
        "truth_empty_only": 1,
        "both_nonempty": 1,
    }
    assert summary["dice"]["mean"] == pytest.approx(0.5)


def test_overlap_is_vectorised_and_matches_the_loop():
    rng = np.random.default_rng(0)
    pred = rng.random((20, 16, 16)) > 0.6
    truth = rng.random((20, 16, 16)) > 0.6
    dice, jaccard = overlap_metrics(pred, truth)
    for i in range(20):
        inter = np.logical_and(pred[i], truth[i]).sum()
        assert dice[i] == pytest.approx(2 * inter / (pred[i].sum() + truth[i].sum()))
        assert jaccard[i] == pytest.approx(inter / np.logical_or(pred[i], truth[i]).sum())


def test_parallel_distances_equal_serial():
    rng = np.random.default_rng(1)
    pred = rng.random((40, 16, 16)) > 0.5
    truth = rng.random((40, 16, 16)) > 0.5
    serial = per_slice_metrics(pred, truth, threads=1)
    parallel = per_slice_metrics(pred, truth, threads=2)
    assert np.allclose(serial[["hd", "assd"]], parallel[["hd", "assd"]])


def test_volume_dice_stacks_a_patients_slices():
    a, b = square(0, 0, 2), square(0, 1, 2)  # 2 of 4 pixels overlap
    empty = np.zeros_like(a)
    pred = np.stack([a, empty, empty])
    truth = np.stack([b, empty, empty])
    volume = volume_dice(pred, truth, np.array(["p1", "p1", "p2"]))
    assert volume["p1"] == pytest.approx(2 * 2 / 8)
    assert volume["p2"] == 1.0  # both volumes empty
