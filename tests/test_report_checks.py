"""The report's checks: one-class classifiers and folds with validation Dice near 0 are
flagged, the ensembles are recomputed without them, and synthetic data / another split level
are named as reasons why the paper's numbers are not comparable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainmri.reporting.checks import (
    checks_html,
    classifier_checks,
    paper_comparability,
    segmentation_checks,
)
from brainmri.reporting.decider import decided_by, decided_by_html
from brainmri.reporting.inputs import ReportFiles
from brainmri.tables import load_table


def write_predictions(root: Path, name: str, labels, preds, probs) -> None:
    folder = root / "classification" / name
    folder.mkdir(parents=True)
    pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(len(labels))],
            "patient": ["p"] * len(labels),
            "label": labels,
            "prob_tumor": probs,
            "pred": preds,
        }
    ).to_csv(folder / "test_predictions.csv", index=False)


def predictions(root: Path, *names: str) -> dict[str, Path]:
    return {n: root / "classification" / n / "test_predictions.csv" for n in names}


def test_one_class_classifier_is_flagged_with_the_ensemble_without_it(tmp_path):
    labels = [1, 1, 0, 0, 0]
    write_predictions(tmp_path, "a", labels, [1, 1, 0, 0, 1], [0.9, 0.8, 0.2, 0.1, 0.6])
    write_predictions(tmp_path, "b", labels, [1, 0, 0, 0, 0], [0.9, 0.3, 0.1, 0.2, 0.3])
    write_predictions(tmp_path, "c", labels, [1, 1, 1, 1, 1], [0.9, 0.9, 0.8, 0.7, 0.9])
    result = classifier_checks(predictions(tmp_path, "a", "b", "c"), "majority")
    assert [d["model"] for d in result["degenerate"]] == ["c"]
    assert "predicts tumor for all 5 test slices" in result["degenerate"][0]["reason"]
    without = result["ensemble_without_degenerate"]
    # With c: votes 3,2,1,1,2 -> 1,1,0,0,1 (accuracy 0.8). Without c, a and b tie on slices 2
    # and 5 (mean probability 0.55 -> tumor, 0.45 -> no tumor): 1,1,0,0,0 (accuracy 1.0).
    assert without["models"] == ["a", "b"] and without["changed_slices"] == 1
    assert without["with"]["accuracy"] == pytest.approx(0.8)
    assert without["without"] == {"accuracy": 1.0, "tumor_f1": 1.0}
    html = checks_html(
        {
            "classification": result,
            "segmentation": {"degenerate": [], "ensemble_without_degenerate": {}},
        }
    )
    assert "<b>c</b>" in html and "would change 1 test decision(s)" in html


def test_healthy_classifiers_are_not_flagged(tmp_path):
    write_predictions(tmp_path, "a", [1, 0], [1, 0], [0.9, 0.1])
    result = classifier_checks(predictions(tmp_path, "a"), "majority")
    assert result == {"degenerate": [], "ensemble_without_degenerate": None}


def test_fold_with_dice_near_zero_is_flagged_and_the_ensemble_recomputed(
    preprocessed_data, tmp_path
):
    root = tmp_path / "results"
    (root / "data" / "lgg").mkdir(parents=True)
    (root / "splits").mkdir()
    for source, target in (
        (preprocessed_data.manifest, root / "data" / "manifest.csv"),
        (preprocessed_data.splits, root / "splits" / "splits.csv"),
        (preprocessed_data.lgg_masks, root / "data" / "lgg" / "masks.npy"),
    ):
        target.symlink_to(source)
    table = load_table(root / "data" / "manifest.csv", root / "splits" / "splits.csv")
    rows = table[table["seg_split"] == "test"]
    truth = np.load(preprocessed_data.lgg_masks)[rows["array_index"].to_numpy()].astype(bool)
    assert truth.any()
    # fold 0 perfect, fold 1 calls everything tumor, fold 2 nothing (validation Dice 0.01).
    stored = [truth.astype(np.uint8) * 255, np.full(truth.shape, 255, np.uint8)]
    stored.append(np.zeros(truth.shape, np.uint8))
    for fold, (probabilities, dice) in enumerate(zip(stored, [0.8, 0.3, 0.01], strict=True)):
        folder = root / "segmentation" / "unet" / f"fold{fold}"
        folder.mkdir(parents=True)
        np.save(folder / "test_probabilities.npy", probabilities)
        (folder / "val_metrics.json").write_text(
            json.dumps({"tumor_slices": {"dice": {"mean": dice}}})
        )
    folds = {f"unet/fold{k}": root / "segmentation" / "unet" / f"fold{k}" for k in range(3)}
    files = ReportFiles(
        {
            "manifest": str(root / "data" / "manifest.csv"),
            "splits": str(root / "splits" / "splits.csv"),
            "masks": str(root / "data" / "lgg" / "masks.npy"),
            "val_metrics": {k: str(f / "val_metrics.json") for k, f in folds.items()},
            "test_probabilities": {k: str(f / "test_probabilities.npy") for k, f in folds.items()},
        }
    )
    result = segmentation_checks(files, ["unet"], 3, 0.5)
    assert [(d["architecture"], d["fold"]) for d in result["degenerate"]] == [("unet", 2)]
    ensemble = result["ensemble_without_degenerate"]["unet"]
    # With fold 2 the mean outside the tumor is 85/255 (< 0.5): perfect. Without it, 128/255
    # (>= 0.5): everything is called tumor and the Dice drops.
    assert ensemble["folds"] == [0, 1] and ensemble["test_dice_with"] == pytest.approx(1.0)
    assert ensemble["test_dice_without"] < 0.9
    html = checks_html(
        {
            "classification": {"degenerate": [], "ensemble_without_degenerate": None},
            "segmentation": result,
        }
    )
    assert "unet fold 2" in html and "would change" in html


def test_paper_comparability_names_the_reasons():
    config = {"data": {"source": "synthetic"}, "split": {"level": "patient"}}
    result = paper_comparability(config)
    assert not result["comparable"] and len(result["reasons"]) == 2
    assert "synthetic" in result["reasons"][0] and "patient" in result["reasons"][1]
    same = paper_comparability({"data": {"source": "kaggle"}, "split": {"level": "slice"}})
    assert same == {"comparable": True, "reasons": []}


def test_gallery_labels_ground_truth_without_a_probability():
    from brainmri.reporting.plotting import error_gallery

    image, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool)
    figure = error_gallery(
        {"examples": [("TCGA_CS_1_2", image, mask, None)], "errors": [("b", image, None, 0.25)]},
        "title",
    )
    first, second = figure.axes[0], figure.axes[1]
    assert "p(tumor)" not in first.get_title() and "examples" in [t.get_text() for t in first.texts]
    assert second.get_title().endswith("p(tumor)=0.25") and second.title.get_fontsize() >= 9
    assert "errors" in [t.get_text() for t in second.texts]


def test_report_files_name_a_missing_or_undeclared_file(tmp_path):
    from brainmri.errors import InputError

    present = tmp_path / "summary.tsv"
    present.write_text("x\n")
    files = ReportFiles(
        {
            "split_summary": str(present),
            "test_metrics": {"a": str(present)},
            "devices": [str(tmp_path / "gone" / "device.json")],
        }
    )
    with pytest.raises(InputError, match=r"gone/device\.json: missing report input \(devices\)"):
        files.check()
    assert files.path("test_metrics", "a") == present
    with pytest.raises(InputError, match="no test_metrics file given for stray"):
        files.path("test_metrics", "stray")
    with pytest.raises(InputError, match="no overlays file given"):
        files.path("overlays")


def decider_files(root: Path, voter: bool) -> ReportFiles:
    """Three backbones' test predictions on one patient's slices 0..3 (two of them wrong on
    slices 1 and 2), the manifest's slice order and, with ``voter``, the voter's k."""
    labels = [1, 0, 1, 0]
    write_predictions(root, "a", labels, [1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1])
    write_predictions(root, "b", labels, [1, 1, 0, 0], [0.9, 0.7, 0.3, 0.2])
    write_predictions(root, "c", labels, [1, 0, 1, 0], [0.8, 0.1, 0.9, 0.1])
    manifest = root / "manifest.csv"
    pd.DataFrame({"id": [f"s{i}" for i in range(4)], "slice_index": range(4)}).to_csv(
        manifest, index=False
    )
    files = {"predictions": {n: str(p) for n, p in predictions(root, "a", "b", "c").items()}}
    files["manifest"] = str(manifest)
    if voter:
        (root / "min_pixels.json").write_text(json.dumps({"min_pixels": 12}))
        files["voter_choice"] = str(root / "min_pixels.json")
    return ReportFiles(files)


def classification_config(method: str, voter: bool) -> dict:
    return {
        "classification": {
            "ensemble": method,
            "threshold": 0.5,
            "smooth_window": 1,
            "segmentation_voter": {"enabled": voter},
        }
    }


PAPER = {"ensemble_accuracy": 0.96, "tumor_f1": 0.94}


def test_the_report_names_the_detector_that_decided(tmp_path):
    files = decider_files(tmp_path, voter=True)
    decision = decided_by(files, classification_config("segmentation", True), ["a", "b", "c"])
    assert decision["detector"] == "segmentation voter (k=12) alone"
    assert decision["min_pixels"] == 12
    # The backbones' majority vote: 1, 1, 0, 0 against labels 1, 0, 1, 0.
    assert decision["classifiers_majority"] == {"accuracy": 0.5, "tumor_f1": 0.5}
    html = decided_by_html(decision, {"accuracy": 0.87, "tumor_f1": 0.8}, PAPER)
    assert "<b>Decided by:</b> segmentation voter (k=12) alone" in html
    assert "the classifiers' majority vote: accuracy 0.500, tumor F1 0.500" in html
    assert "accuracy 0.870 (-0.090 vs the paper's 0.96), tumor F1 0.800 (-0.140 vs 0.94)" in html

    majority = decided_by(files, classification_config("majority", True), ["a", "b", "c"])
    assert majority["detector"] == "majority vote of a, b, c + segmentation voter (k=12)"
    assert majority["classifiers_majority"] is None
    html = decided_by_html(majority, {"accuracy": 0.96, "tumor_f1": 0.95}, PAPER)
    assert "majority vote of a, b, c + segmentation voter (k=12)." in html
    assert "classifiers' majority vote" not in html and "(+0.010 vs 0.94)" in html

    plain = decided_by(
        decider_files(tmp_path / "plain", voter=False),
        classification_config("soft", False),
        ["a", "b", "c"],
    )
    assert plain["detector"] == "soft vote of a, b, c" and plain["min_pixels"] is None


def test_method_segmentation_checks_the_classifiers_majority(tmp_path):
    labels = [1, 1, 0, 0, 0]
    write_predictions(tmp_path, "a", labels, [1, 1, 0, 0, 1], [0.9, 0.8, 0.2, 0.1, 0.6])
    write_predictions(tmp_path, "b", labels, [1, 0, 0, 0, 0], [0.9, 0.3, 0.1, 0.2, 0.3])
    write_predictions(tmp_path, "c", labels, [1, 1, 1, 1, 1], [0.9, 0.9, 0.8, 0.7, 0.9])
    paths = predictions(tmp_path, "a", "b", "c")
    assert classifier_checks(paths, "segmentation") == classifier_checks(paths, "majority")
