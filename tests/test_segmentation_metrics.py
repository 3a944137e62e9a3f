"""Segmentation metrics against values computed by hand, including every empty-mask case."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from brainmri.evaluation import segmentation as segmentation_metrics
from brainmri.evaluation.masks import binarize, quantize
from brainmri.evaluation.segmentation import (
    distance_metrics,
    evaluate_split,
    overlap_metrics,
    per_slice_metrics,
    summarize_slices,
    volume_dice,
)


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


def random_boxes(count: int, size: int, seed: int) -> np.ndarray:
    """Masks of one or two random rectangles, many touching the image edge."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size, size), dtype=bool)
    for mask in masks:
        for _ in range(rng.integers(1, 3)):
            top, left = rng.integers(0, size, 2)
            height, width = rng.integers(1, size // 2, 2)
            mask[top : top + height, left : left + width] = True
    return masks


def test_distances_equal_medpy_on_the_whole_image():
    # The metrics crop each pair to its bounding box; the values must not change.
    from medpy.metric import binary

    pred, truth = random_boxes(60, 24, 1), random_boxes(60, 24, 2)
    hd, assd = distance_metrics(pred, truth)
    for i in range(60):
        assert hd[i] == binary.hd(pred[i], truth[i])
        assert assd[i] == pytest.approx(binary.assd(pred[i], truth[i]), rel=1e-12)


def test_parallel_distances_equal_serial(monkeypatch):
    pred, truth = random_boxes(40, 16, 3), random_boxes(40, 16, 4)
    pred[5] = False  # an empty case among them
    serial = per_slice_metrics(pred, truth, threads=1)
    # use the pool even for 39 pairs
    monkeypatch.setattr(segmentation_metrics, "PARALLEL_MIN_PAIRS", 0)
    parallel = per_slice_metrics(pred, truth, threads=2)
    pd.testing.assert_frame_equal(serial, parallel)


def test_volume_dice_stacks_a_patients_slices():
    a, b = square(0, 0, 2), square(0, 1, 2)  # 2 of 4 pixels overlap
    empty = np.zeros_like(a)
    pred = np.stack([a, empty, empty])
    truth = np.stack([b, empty, empty])
    volume = volume_dice(pred, truth, np.array(["p1", "p1", "p2"]))
    assert volume["p1"] == pytest.approx(2 * 2 / 8)
    assert volume["p2"] == 1.0  # both volumes empty


def test_five_pixel_squares_offset_by_one_pixel_by_hand():
    # Two 5x5 squares in a 10x10 image, the prediction one column to the right.
    truth = square(2, 2, 5, 10)
    pred = square(2, 3, 5, 10)
    row = per_slice_metrics(pred[None], truth[None]).iloc[0]
    assert row["dice"] == pytest.approx(2 * 20 / 50)  # 20 of 25 pixels overlap
    assert row["jaccard"] == pytest.approx(20 / 30)
    assert row["hd"] == pytest.approx(1.0)
    # A 5x5 surface has 16 pixels. pred's top/bottom rows: columns 3-6 lie on truth's surface
    # (0), column 7 is 1 px from it; pred's left column rows 3-5 are truth's interior (1 px
    # from column 2); its right column rows 3-5 are 1 px from column 6: (2 + 3 + 3) / 16.
    assert row["assd"] == pytest.approx(8 / 16)


def test_five_pixel_squares_offset_by_two_pixels_by_hand():
    truth = square(2, 2, 5, 10)
    pred = square(2, 4, 5, 10)
    row = per_slice_metrics(pred[None], truth[None]).iloc[0]
    assert row["dice"] == pytest.approx(2 * 15 / 50)
    assert row["jaccard"] == pytest.approx(15 / 35)
    assert row["hd"] == pytest.approx(2.0)
    # pred's surface -> truth's surface: top and bottom rows 0, 0, 0, 1, 2 each (6); left
    # column (4) rows 3, 4, 5: 1, 2, 1 (4); right column (8) rows 3-5: 2 each (6). 16 / 16,
    # the same the other way by symmetry.
    assert row["assd"] == pytest.approx(1.0)


def test_distances_of_a_batch_follow_the_empty_rules_and_medpy():
    empty = np.zeros((10, 10), dtype=bool)
    pred = np.stack([empty, square(2, 3, 5, 10), empty, square(0, 0, 2, 10)])
    truth = np.stack([empty, square(2, 2, 5, 10), square(0, 0, 2, 10), empty])
    hd, assd = distance_metrics(pred, truth)
    diagonal = math.hypot(10, 10)
    assert hd.tolist() == pytest.approx([0.0, 1.0, diagonal, diagonal])
    assert assd.tolist() == pytest.approx([0.0, 0.5, diagonal, diagonal])


def test_quantize_and_binarize_round_trip():
    probs = np.array([0.0, 0.2, 0.498, 0.5, 0.502, 1.0, 1.3, -0.1])
    stored = quantize(probs)
    assert stored.dtype == np.uint8
    assert stored.tolist() == [0, 51, 127, 128, 128, 255, 255, 0]
    # value / 255 >= threshold: 127 / 255 = 0.498 < 0.5 <= 128 / 255
    assert binarize(stored, 0.5).tolist() == [False, False, False, True, True, True, True, False]
    assert binarize(stored, 0.2).tolist() == [False, True, True, True, True, True, True, False]
    with pytest.raises(ValueError, match="uint8"):
        binarize(probs, 0.5)


def test_evaluate_split_reports_tumor_and_all_slices_and_volumes():
    empty = np.zeros((8, 8), dtype=bool)
    truth = np.stack([square(1, 1), square(1, 1), empty, empty])
    stored = quantize(np.stack([square(1, 1), empty, square(1, 1), empty]).astype(float))
    rows = pd.DataFrame(
        {"id": list("abcd"), "patient": ["p", "p", "q", "q"], "has_tumor": [1, 1, 0, 0]}
    )
    frame, report = evaluate_split(rows, stored, truth, 0.5, "test")
    assert list(frame.columns[:4]) == ["id", "patient", "split", "has_tumor"]
    assert frame["dice"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert report["tumor_slices"]["dice"] == {"mean": 0.5, "std": 0.5}
    assert report["tumor_slices"]["n_slices"] == 2
    assert report["all_slices"]["dice"]["mean"] == pytest.approx(0.5)
    assert report["all_slices"]["cases"]["truth_empty_only"] == 1
    # p: 9 of 18 pixels found -> 2 * 9 / 27; q: a false blob in an empty volume -> 0
    assert report["volume_dice"]["patients"] == pytest.approx({"p": 18 / 27, "q": 0.0})
    assert (report["split"], report["n_slices"], report["threshold"]) == ("test", 4, 0.5)
