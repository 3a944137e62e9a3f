"""Per-patient metrics (Buda volume Dice, HD95, slice sensitivity) and the bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainmri.evaluation.bootstrap import bootstrap_ci, grouped_bootstrap, paired_difference
from brainmri.evaluation.patients import (
    buda_volume_dice,
    dice,
    hd95_slice,
    largest_component,
    patient_metrics,
)


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_largest_component_drops_the_smaller_3d_blob():
    volume = np.zeros((4, 16, 16), dtype=bool)
    volume[0:3, 2:8, 2:8] = True  # 108 voxels
    volume[3, 12:14, 12:14] = True  # 4 voxels, not 6-connected to the first
    kept = largest_component(volume)
    assert kept.sum() == 108 and not kept[3, 12:14, 12:14].any()
    assert not largest_component(np.zeros((2, 4, 4), bool)).any()


def test_buda_volume_dice_ignores_a_false_positive_component():
    truth = np.zeros((3, 16, 16), dtype=bool)
    truth[:, 2:8, 2:8] = True
    pred = truth.copy()
    pred[1, 12:16, 12:16] = True  # a stray component
    assert dice(pred, truth) == pytest.approx(2 * 108 / (108 + 124))
    assert buda_volume_dice(pred, truth) == pytest.approx(1.0)


def test_hd95_of_shifted_squares_is_the_shift_and_nan_when_empty():
    a, b = square(32, 4, 4, 10), square(32, 4, 7, 10)
    assert hd95_slice(a, b) == pytest.approx(3.0)
    assert hd95_slice(a, a) == 0.0
    assert np.isnan(hd95_slice(a, np.zeros_like(a)))


def test_patient_metrics_counts_missed_and_false_positive_slices():
    size = 16
    truth = np.stack(
        [square(size, 2, 2, 6), square(size, 2, 2, 6), np.zeros((size, size), bool)] * 2
    )
    pred = truth.copy()
    pred[1] = False  # patient A misses its second tumor slice
    pred[5] = square(size, 10, 10, 3)  # patient B: a false positive on its empty slice
    rows = pd.DataFrame(
        {
            "patient": ["A"] * 3 + ["B"] * 3,
            "slice_index": [1, 2, 3, 1, 2, 3],
            "missing_modalities": [""] * 3 + ["pre-contrast"] * 3,
        }
    )
    frame = patient_metrics(pred, truth, rows)
    a, b = frame.loc["A"], frame.loc["B"]
    assert (a["tumor_slices"], a["missed_tumor_slices"], a["false_positive_slices"]) == (2, 1, 0)
    assert a["slice_sensitivity"] == 0.5 and a["dice_tumor_slices"] == 0.5
    assert a["volume_dice"] == pytest.approx(2 * 36 / (36 + 72))
    assert (b["missed_tumor_slices"], b["false_positive_slices"]) == (0, 1)
    assert b["volume_dice"] == pytest.approx(2 * 72 / (72 + 81))
    assert b["buda_volume_dice"] == pytest.approx(1.0)  # the stray blob is not the largest
    assert b["hd95"] == 0.0 and b["missing_modalities"] == "pre-contrast"


def test_bootstrap_ci_on_fixed_numbers():
    constant = np.full(10, 0.1)
    assert bootstrap_ci(constant) == pytest.approx((0.1, 0.1))
    values = np.array([0.0, 1.0] * 10)
    low, high = bootstrap_ci(values, n_boot=4000, seed=1)
    assert 0.25 < low < 0.5 < high < 0.75
    assert bootstrap_ci(values, n_boot=4000, seed=1) == (low, high)  # seeded
    # NaNs (e.g. no tumor slice) are dropped, fewer than two values give no interval
    assert np.isnan(bootstrap_ci(np.array([np.nan, 1.0]))[0])


def test_paired_difference_aligns_patients_and_flags_zero():
    reference = pd.Series({"a": 0.5, "b": 0.6, "c": 0.7, "d": np.nan})
    better = pd.Series({"c": 0.8, "a": 0.6, "b": 0.7, "d": 0.9})  # +0.1 each, other order
    result = paired_difference(better, reference, n_boot=500)
    assert result["n"] == 3
    assert result["mean"] == pytest.approx(0.1) and result["median"] == pytest.approx(0.1)
    assert result["ci_low"] == pytest.approx(0.1) and result["excludes_zero"]
    mixed = pd.Series({"a": 0.6, "b": 0.5, "c": 0.7, "d": 0.0})  # +0.1, -0.1, 0
    result = paired_difference(mixed, reference, n_boot=2000)
    assert result["ci_low"] < 0 < result["ci_high"] and not result["excludes_zero"]


def test_grouped_bootstrap_resamples_whole_patients():
    # patient x: 4 correct slices; patient y: 1 wrong slice. Draws of whole patients give
    # pooled accuracies in {0, 0.8, 1}; never a value a slice-level draw would give (e.g. 0.5).
    groups = np.array(["x"] * 4 + ["y"])
    correct = np.array([1.0, 1, 1, 1, 0])
    seen = set()

    def statistic(index):
        value = float(correct[index].mean())
        seen.add(round(value, 6))
        return value

    low, high = grouped_bootstrap(groups, statistic, n_boot=300, seed=0)
    assert seen <= {0.0, 0.8, 1.0} and low == 0.0 and high == 1.0
