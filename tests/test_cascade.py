"""The classify-then-segment cascade on hand-made arrays: a gate that drops a tumor slice, a
false positive removed by the gate, and the comparison with segmentation alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainmri.errors import InputError
from brainmri.evaluation.cascade import (
    comparison_table,
    detection,
    gate_from_classifier,
    run_cascade,
)


def square(top: int, left: int, size: int = 2, shape: int = 6) -> np.ndarray:
    mask = np.zeros((shape, shape), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


EMPTY = np.zeros((6, 6), dtype=bool)
# Four test slices of two patients:
#   a: tumor (4 px), segmented exactly, the classifier says tumor -> kept.
#   b: tumor (9 px), segmentation finds 6 of the 9 px, the classifier says no tumor -> dropped.
#   c: no tumor, segmentation draws a 4 px false blob, the classifier says no tumor -> removed.
#   d: no tumor, nothing segmented, the classifier says tumor (a harmless false alarm).
ROWS = pd.DataFrame(
    {"id": list("abcd"), "patient": ["p", "p", "q", "q"], "has_tumor": [1, 1, 0, 0]}
)
TRUTH = np.stack([square(0, 0), square(1, 1, 3), EMPTY, EMPTY])
SEGMENTATION = np.stack([square(0, 0), square(1, 2, 3) & square(1, 1, 3), square(3, 3), EMPTY])
GATE = np.array([True, False, False, True])


def test_cascade_drops_a_tumor_slice_and_removes_a_false_positive():
    per_slice, results = run_cascade(GATE, SEGMENTATION, TRUTH, ROWS)
    alone, cascade = results["segmentation_only"], results["cascade"]
    # Per slice (empty-mask rules): alone a=1, b=2*6/15, c=0 (false blob), d=1 (both empty).
    assert per_slice["segmentation_dice"].tolist() == pytest.approx([1, 0.8, 0, 1])
    # Cascade: b loses its mask (0), c's blob is gone (both empty -> 1).
    assert per_slice["cascade_dice"].tolist() == pytest.approx([1, 0, 1, 1])
    assert alone["dice_all_slices"] == pytest.approx(2.8 / 4)
    assert cascade["dice_all_slices"] == pytest.approx(3 / 4)
    assert alone["dice_tumor_slices"] == pytest.approx(0.9)
    assert cascade["dice_tumor_slices"] == pytest.approx(0.5)
    # Volumes: p alone 2 * (4 + 6) / (10 + 13) = 20/23, cascade 2 * 4 / (4 + 13) = 8/17;
    # q alone: a blob in an empty volume -> 0, cascade: both empty -> 1.
    assert alone["volume_dice"] == pytest.approx((20 / 23 + 0) / 2)
    assert cascade["volume_dice"] == pytest.approx((8 / 17 + 1) / 2)
    # Detection: a slice is positive when its mask is not empty.
    assert alone["detection"] == {
        "sensitivity": 1.0,
        "specificity": 0.5,
        "false_positive_slices": 1,
        "false_negative_slices": 0,
        "true_positive_slices": 2,
        "true_negative_slices": 1,
    }
    assert cascade["detection"]["sensitivity"] == 0.5
    assert cascade["detection"]["specificity"] == 1.0
    assert cascade["detection"]["false_positive_slices"] == 0
    assert cascade["cases"] == {
        "both_empty": 2,
        "pred_empty_only": 1,
        "truth_empty_only": 0,
        "both_nonempty": 1,
    }
    gate = cascade["gate"]
    assert gate["tumor_slices_dropped"] == 1
    assert gate["tumor_pixels_total"] == 13
    assert gate["tumor_pixels_lost"] == 9
    assert gate["tumor_area_lost_fraction"] == pytest.approx(9 / 13)
    assert gate["tumor_pixels_segmentation_found_on_dropped_slices"] == 6
    assert gate["tumor_area_segmentation_found_on_dropped_fraction"] == pytest.approx(6 / 13)
    assert gate["false_positive_slices_removed"] == 1
    assert gate["slices_called_tumor"] == 2
    assert per_slice["gate"].tolist() == [1, 0, 0, 1]
    assert per_slice["cascade_pred_area"].tolist() == [4, 0, 0, 0]
    assert per_slice["segmentation_pred_area"].tolist() == [4, 6, 4, 0]


def test_a_gate_that_passes_everything_changes_nothing():
    _, results = run_cascade(np.ones(4, bool), SEGMENTATION, TRUTH, ROWS)
    alone, cascade = results["segmentation_only"], results["cascade"]
    for key in ("dice_all_slices", "dice_tumor_slices", "volume_dice", "hd_all_slices"):
        assert cascade[key] == alone[key]
    assert cascade["gate"]["tumor_pixels_lost"] == 0


def test_comparison_table_has_one_row_per_pipeline():
    _, results = run_cascade(GATE, SEGMENTATION, TRUTH, ROWS)
    table = comparison_table(results)
    assert table["pipeline"].tolist() == ["segmentation only", "cascade"]
    assert table["false-positive slices"].tolist() == [1, 0]
    assert table["dice (all test slices)"].tolist() == pytest.approx([0.7, 0.75])


def test_detection_without_negatives_has_no_specificity():
    result = detection(np.array([True, False]), np.array([1, 1]))
    assert result["sensitivity"] == 0.5 and result["specificity"] is None


def test_gate_follows_ids_and_refuses_missing_decisions():
    decisions = pd.DataFrame({"id": ["d", "c", "b", "a", "x"], "pred": [1, 0, 0, 1, 1]})
    assert gate_from_classifier(decisions, ROWS, "ens.csv").tolist() == [True, False, False, True]
    with pytest.raises(InputError, match=r"ens\.csv: no decision for 1 of the 4 test slices"):
        gate_from_classifier(decisions[decisions["id"] != "b"], ROWS, "ens.csv")


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="3 decisions"):
        run_cascade(GATE[:3], SEGMENTATION, TRUTH, ROWS)
