"""Ensembles: the classifiers' vote over prediction tables (ties, checks), the segmentation fold
ensemble of stored probabilities, and the fold summaries of Tables 1 and 2."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from brainmri.errors import InputError
from brainmri.evaluation.classification import read_predictions
from brainmri.evaluation.decision import (
    EnsembleRule,
    add_ensemble_arguments,
    ensemble_decision,
    ensemble_predictions,
    ensemble_rule,
)
from brainmri.evaluation.masks import mean_probabilities
from brainmri.evaluation.summary import ensemble_row, fold_summary, select_overlay_slices, table_row


def predictions(preds, probs, labels=None, ids=None) -> pd.DataFrame:
    n = len(preds)
    return pd.DataFrame(
        {
            "id": ids or [f"s{i}" for i in range(n)],
            "patient": ["p"] * n,
            "label": labels or [1] * n,
            "prob_tumor": probs,
            "pred": preds,
        }
    )


def test_majority_vote_of_tables_adds_votes_and_keeps_a_backbones_columns():
    frames = {
        "a.csv": predictions([1, 0, 1], [0.9, 0.2, 0.6]),
        "b.csv": predictions([1, 1, 0], [0.8, 0.7, 0.4]),
        "c.csv": predictions([0, 0, 0], [0.3, 0.1, 0.2]),
    }
    result, ties = ensemble_predictions(frames, "majority", 0.5)
    assert list(result.columns) == ["id", "patient", "label", "prob_tumor", "pred", "votes"]
    assert result["votes"].tolist() == [2, 1, 1]
    assert result["pred"].tolist() == [1, 0, 0]
    assert result["prob_tumor"].tolist() == pytest.approx([2 / 3, 1 / 3, 0.4])
    assert ties == 0


def test_two_models_tie_goes_to_the_mean_probability():
    frames = {
        "a.csv": predictions([1, 1, 0], [0.9, 0.55, 0.1]),
        "b.csv": predictions([0, 0, 0], [0.2, 0.35, 0.3]),
    }
    result, ties = ensemble_predictions(frames, "majority", 0.5)
    # ties on the first two rows: means 0.55 -> tumor, 0.45 -> no tumor
    assert result["votes"].tolist() == [1, 1, 0]
    assert result["pred"].tolist() == [1, 0, 0]
    assert ties == 2


def test_four_models_two_to_two_tie_and_three_to_one():
    frames = {
        "a.csv": predictions([1, 1], [0.6, 0.9]),
        "b.csv": predictions([1, 1], [0.6, 0.9]),
        "c.csv": predictions([0, 1], [0.1, 0.6]),
        "d.csv": predictions([0, 0], [0.45, 0.0]),
    }
    result, ties = ensemble_predictions(frames, "majority", 0.5)
    assert result["votes"].tolist() == [2, 3]
    # 2-2 tie, mean 0.4375 -> no tumor; 3-1 majority -> tumor
    assert result["pred"].tolist() == [0, 1]
    assert ties == 1


def test_soft_vote_differs_from_majority_on_the_same_tables():
    frames = {
        "a.csv": predictions([1], [0.51]),
        "b.csv": predictions([1], [0.51]),
        "c.csv": predictions([0], [0.0]),
    }
    assert ensemble_predictions(frames, "majority", 0.5)[0]["pred"].tolist() == [1]
    soft, ties = ensemble_predictions(frames, "soft", 0.5)
    assert soft["pred"].tolist() == [0] and ties == 0  # mean 0.34


def test_segmentation_method_the_voter_decides_alone_then_smoothing():
    # Two classifiers that agree on tumor for slices 0, 1 and 4; the voter (k = 5) says tumor
    # on slices 1, 3 and 4 of one patient's slices 0..4.
    probs = np.array([[0.9, 0.9, 0.1, 0.1, 0.9], [0.8, 0.7, 0.2, 0.1, 0.9]])
    areas = np.array([4, 10, 0, 5, 12])
    order = (np.array(["p"] * 5), np.array([0, 1, 2, 3, 4]))
    plain = ensemble_decision(EnsembleRule("segmentation", 0.5, 5), probs, areas, order)
    assert plain.pred.tolist() == [0, 1, 0, 1, 1]  # the voter's, not the classifiers' 1,1,0,0,1
    assert plain.probability.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]  # the voter's 0/1
    assert plain.votes.tolist() == [2, 3, 0, 1, 3]  # every voter counted
    assert plain.segmentation_voter.tolist() == [0, 1, 0, 1, 1] and not plain.smoothed
    majority = ensemble_decision(EnsembleRule("majority", 0.5, 5), probs, areas, order)
    assert majority.pred.tolist() == [1, 1, 0, 0, 1]  # the two classifiers outvote the voter
    smoothed = ensemble_decision(EnsembleRule("segmentation", 0.5, 5, 3), probs, areas, order)
    # Windows of 3 along the slice order: [0,1] tie -> own 0, [0,1,0] -> 0, [1,0,1] -> 1, ...
    assert smoothed.pred.tolist() == [0, 0, 1, 1, 1] and smoothed.smoothed
    assert smoothed.votes.tolist() == plain.votes.tolist()


def test_segmentation_method_needs_the_voter():
    with pytest.raises(InputError, match=r"segmentation_voter\.enabled: true"):
        EnsembleRule("segmentation", 0.5)
    with pytest.raises(ValueError, match="unknown ensemble method 'median'"):
        EnsembleRule("median", 0.5, 3)
    frames = {"a.csv": predictions([1], [0.9])}
    with pytest.raises(InputError, match="segmentation voter"):
        ensemble_predictions(frames, "segmentation", 0.5)
    result, ties = ensemble_predictions(frames, "segmentation", 0.5, np.array([2]), 3)
    assert result["pred"].tolist() == [0] and result["votes"].tolist() == [1] and ties == 0
    assert result["segmentation_voter"].tolist() == [0] and result["prob_tumor"].tolist() == [0]


def test_predict_options_with_method_segmentation(tmp_path):
    parser = argparse.ArgumentParser()
    add_ensemble_arguments(parser)
    common = ["--classifier-threshold", "0.5", "--segmentation-threshold", "0.5"]
    args = parser.parse_args(["--method", "segmentation", *common])
    with pytest.raises(InputError, match="--method segmentation needs --segmentation-voter"):
        ensemble_rule(args)
    choice = tmp_path / "min_pixels.json"
    choice.write_text(json.dumps({"min_pixels": 7, "threshold": 0.5}))
    args = parser.parse_args(
        ["--method", "segmentation", *common, "--segmentation-voter", str(choice)]
    )
    assert ensemble_rule(args) == EnsembleRule("segmentation", 0.5, 7, 1)


def test_tables_with_other_ids_or_order_or_labels_are_refused():
    a = predictions([1, 0], [0.9, 0.1])
    swapped = predictions([1, 0], [0.9, 0.1], ids=["s1", "s0"])
    with pytest.raises(InputError, match=r"b\.csv: its ids differ from those of a\.csv"):
        ensemble_predictions({"a.csv": a, "b.csv": swapped}, "majority", 0.5)
    shorter = predictions([1], [0.9])
    with pytest.raises(InputError, match=r"b\.csv: its ids differ"):
        ensemble_predictions({"a.csv": a, "b.csv": shorter}, "majority", 0.5)
    relabelled = predictions([1, 0], [0.9, 0.1], labels=[0, 0])
    with pytest.raises(InputError, match=r"b\.csv: its labels differ"):
        ensemble_predictions({"a.csv": a, "b.csv": relabelled}, "majority", 0.5)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty file"),
        ("id,patient,label,pred\ns0,p,1,1\n", r"missing column\(s\) \['prob_tumor'\]"),
        ("id,patient,label,prob_tumor,pred\n", "no predictions"),
        ("id,patient,label,prob_tumor,pred\ns0,p,1,0.5,2\n", "pred must be 0 or 1"),
        ("id,patient,label,prob_tumor,pred\ns0,p,1,,1\n", r"prob_tumor must be a number"),
        ("id,patient,label,prob_tumor,pred\ns0,p,1,1.5,1\n", r"prob_tumor must be a number"),
        ("id,patient,label,prob_tumor,pred\ns0,p,1,0.5,1\ns0,p,1,0.5,1\n", "duplicate id"),
    ],
)
def test_bad_prediction_files_are_named(tmp_path, text, problem):
    path = tmp_path / "test_predictions.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as error:
        read_predictions(path)
    assert str(path) in str(error.value)


def test_fold_ensemble_is_the_rounded_mean_in_any_fold_order():
    a = np.array([[[0, 255], [100, 101]]], dtype=np.uint8)
    b = np.array([[[255, 255], [101, 101]]], dtype=np.uint8)
    c = np.array([[[0, 0], [101, 102]]], dtype=np.uint8)
    mean = mean_probabilities([a, b, c])
    assert mean.dtype == np.uint8
    assert mean.tolist() == [[[85, 170], [101, 101]]]  # 302 / 3 = 100.67 -> 101; 304/3 -> 101
    assert (mean_probabilities([c, a, b]) == mean).all()
    with pytest.raises(ValueError, match="differ in shape"):
        mean_probabilities([a, np.zeros((2, 2, 2), np.uint8)])


def fold_report(dice: float, all_dice: float, volume: float, cases: int = 1) -> dict:
    scope = {
        "dice": {"mean": dice, "std": 0.1},
        "jaccard": {"mean": dice / 2, "std": 0.1},
        "hd": {"mean": 10 * dice, "std": 1.0},
        "assd": {"mean": dice, "std": 1.0},
        "n_slices": 3,
        "cases": {
            "both_empty": 0,
            "pred_empty_only": cases,
            "truth_empty_only": 0,
            "both_nonempty": 2,
        },
    }
    return {
        "tumor_slices": scope,
        "all_slices": {**scope, "dice": {"mean": all_dice, "std": 0.0}},
        "volume_dice": {"mean": volume, "std": 0.0},
    }


def test_fold_summary_is_mean_and_std_over_the_folds_means():
    reports = [fold_report(0.6, 0.8, 0.7), fold_report(0.8, 0.9, 0.9, cases=2)]
    summary = fold_summary(reports)
    assert summary["tumor_slices"]["dice"] == pytest.approx({"mean": 0.7, "std": 0.1, "n": 2})
    assert summary["tumor_slices"]["hd"]["mean"] == pytest.approx(7.0)
    assert summary["all_slices"]["dice"]["mean"] == pytest.approx(0.85)
    assert summary["volume_dice"]["mean"] == pytest.approx(0.8)
    assert summary["tumor_slices"]["cases"]["pred_empty_only"] == 3
    assert summary["tumor_slices"]["n_slices"] == 6
    row = table_row("unet", summary)
    assert row["dice"] == "0.700 ± 0.100"
    assert row["hd (px)"] == "7.000 ± 1.000"
    assert row["dice (all slices)"] == "0.850 ± 0.050"
    assert row["volume dice"] == "0.800 ± 0.100"
    single = ensemble_row("unet", fold_report(0.75, 0.9, 0.8))
    assert single["model"] == "unet (fold ensemble)" and single["dice"] == "0.750"


def test_fold_summary_without_tumor_slices_leaves_cells_empty():
    report = fold_report(0.5, 0.9, 0.9)
    report["tumor_slices"] = {
        **report["tumor_slices"],
        **{m: {"mean": None, "std": None} for m in ("dice", "jaccard", "hd", "assd")},
    }
    summary = fold_summary([report])
    assert summary["tumor_slices"]["dice"] == {"mean": None, "std": None, "n": 0}
    assert table_row("unet", summary)["dice"] == ""


def test_overlay_selection_has_failures_successes_and_is_seeded():
    frame = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(10)],
            "has_tumor": [1, 1, 1, 1, 1, 1, 1, 0, 0, 1],
            "dice": [0.5, 0.1, 0.9, 0.95, 0.3, 0.6, 0.7, 1.0, 1.0, 0.0],
        }
    )
    chosen = select_overlay_slices(frame, 5, seed=3)
    assert chosen[:2] == [9, 1]  # the two lowest Dice among tumor slices
    assert chosen[2:4] == [3, 2]  # the two highest
    assert len(chosen) == 5 and chosen[4] in {0, 4, 5, 6}
    assert select_overlay_slices(frame, 5, seed=3) == chosen
    assert 7 not in select_overlay_slices(frame, 8, seed=0)  # tumor slices only
    assert len(select_overlay_slices(frame, 20, seed=0)) == 8


def test_a_single_models_file_gets_its_decisions_from_the_cut_off(tmp_path):
    path = tmp_path / "test_predictions.csv"
    path.write_text("id,patient,label,prob_tumor\ns0,p,1,0.35\ns1,p,0,0.6\n")
    assert read_predictions(path, 0.5)["pred"].tolist() == [0, 1]
    assert read_predictions(path, 0.3)["pred"].tolist() == [1, 1]
    with pytest.raises(InputError, match=r"missing column\(s\) \['pred'\]"):
        read_predictions(path)  # no cut-off: the file must hold decisions (an ensemble's)
