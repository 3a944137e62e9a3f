"""Checks the report makes on a run: degenerate models, and whether its numbers can be compared
with the paper's.

Degenerate models: a classifier that predicts one class for every test slice (its accuracy is
then the majority rate, whatever its ROC AUC), and a segmentation fold whose validation Dice on
tumor slices stays below :data:`DEGENERATE_DICE`. For each, the ensemble is recomputed without
it from the stored test predictions, to say whether the ensemble would change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from brainmri.evaluation.classification import CLASS_NAMES, read_predictions
from brainmri.evaluation.decision import ensemble_predictions
from brainmri.evaluation.masks import binarize, load_masks, load_probabilities, mean_probabilities
from brainmri.evaluation.segmentation import overlap_metrics
from brainmri.io import read_json
from brainmri.reporting.inputs import ReportFiles
from brainmri.tables import load_table

# Validation Dice (tumor slices, mean over the fold's slices) below which a fold is flagged.
DEGENERATE_DICE = 0.05


def accuracy_f1(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Slice accuracy and tumor F1 of 0/1 decisions."""
    true_pos = int(((preds == 1) & (labels == 1)).sum())
    predicted, actual = int((preds == 1).sum()), int((labels == 1).sum())
    f1 = 2 * true_pos / (predicted + actual) if predicted + actual else 0.0
    return {"accuracy": float((preds == labels).mean()), "tumor_f1": f1}


def classifier_checks(
    predictions: dict[str, Path], method: str, cutoff: float = 0.5
) -> dict[str, Any]:
    """One-class classifiers (backbone -> its test_predictions.csv, at the classifier cut-off),
    and the ensemble's metrics with and without them. ``method`` segmentation (the voter
    decides alone, whatever the classifiers say): their majority vote instead."""
    method = "majority" if method == "segmentation" else method
    frames = {b: read_predictions(path, cutoff) for b, path in predictions.items()}
    flagged = []
    for name, frame in frames.items():
        classes = sorted(set(frame["pred"]))
        if len(classes) == 1:
            majority = float((frame["label"] == frame["label"].mode()[0]).mean())
            flagged.append(
                {
                    "model": name,
                    "reason": f"predicts {CLASS_NAMES[classes[0]]} for all {len(frame)} test "
                    f"slices (accuracy = the majority rate {majority:.3f}, whatever its AUC)",
                }
            )
    result: dict[str, Any] = {"degenerate": flagged, "ensemble_without_degenerate": None}
    kept = {name: f for name, f in frames.items() if name not in {d["model"] for d in flagged}}
    if flagged and kept:
        full, _ = ensemble_predictions(frames, method, cutoff)
        without, _ = ensemble_predictions(kept, method, cutoff)
        labels = full["label"].to_numpy()
        changed = int((full["pred"].to_numpy() != without["pred"].to_numpy()).sum())
        result["ensemble_without_degenerate"] = {
            "models": list(kept),
            "changed_slices": changed,
            "with": accuracy_f1(labels, full["pred"].to_numpy()),
            "without": accuracy_f1(labels, without["pred"].to_numpy()),
        }
    return result


def segmentation_checks(
    files: ReportFiles, architectures: list[str], folds: int, threshold: float
) -> dict[str, Any]:
    """Folds with validation Dice near 0, and each fold ensemble's test Dice without them.

    Reads ``val_metrics`` and ``test_probabilities`` (by ``arch/foldK``), ``manifest``,
    ``splits`` and ``masks`` of ``files``."""
    flagged = []
    for arch in architectures:
        for fold in range(folds):
            metrics = read_json(files.path("val_metrics", f"{arch}/fold{fold}"))
            dice = metrics["tumor_slices"]["dice"]["mean"]
            if dice is None or dice < DEGENERATE_DICE:
                flagged.append(
                    {
                        "architecture": arch,
                        "fold": fold,
                        "val_dice": dice,
                        "reason": f"validation Dice on tumor slices "
                        f"{'n/a' if dice is None else f'{dice:.3f}'} < {DEGENERATE_DICE}",
                    }
                )
    result: dict[str, Any] = {"degenerate": flagged, "ensemble_without_degenerate": {}}
    if not flagged:
        return result
    table = load_table(files.path("manifest"), files.path("splits"))
    rows = table[table["seg_split"] == "test"]
    masks = load_masks(files.path("masks"), rows)
    tumor = masks.reshape(len(masks), -1).any(1)
    for arch in sorted({d["architecture"] for d in flagged}):
        bad = {d["fold"] for d in flagged if d["architecture"] == arch}
        kept = [k for k in range(folds) if k not in bad]
        if not kept or not tumor.any():
            continue
        stored = {
            k: load_probabilities(files.path("test_probabilities", f"{arch}/fold{k}"), masks.shape)
            for k in range(folds)
        }
        dice = {}
        for name, chosen in (("with", list(range(folds))), ("without", kept)):
            pred = binarize(mean_probabilities([stored[k] for k in chosen]), threshold)
            dice[name] = float(overlap_metrics(pred[tumor], masks[tumor])[0].mean())
        result["ensemble_without_degenerate"][arch] = {
            "folds": kept,
            "test_dice_with": dice["with"],
            "test_dice_without": dice["without"],
        }
    return result


def paper_comparability(config: dict[str, Any]) -> dict[str, Any]:
    """Whether this run's numbers can be set beside the paper's, and why not."""
    reasons = []
    if config["data"]["source"] == "synthetic":
        reasons.append(
            "the data are synthetic (generated MRI-like images), not the paper's LGG dataset"
        )
    if config["split"]["level"] != "slice":
        reasons.append(
            f"the split is by {config['split']['level']}, the paper's by slice "
            "(slices of one patient on both sides of the split)"
        )
    return {"comparable": not reasons, "reasons": reasons}


def run_checks(files: ReportFiles, config: dict[str, Any], backbones: list[str]) -> dict[str, Any]:
    """Everything above, as the ``checks`` entry of report/metrics.json."""
    seg = config["segmentation"]
    architectures = [a["name"] for a in seg["architectures"]]
    return {
        "classification": classifier_checks(
            {b: files.path("predictions", b) for b in backbones},
            config["classification"]["ensemble"],
            float(config["classification"].get("threshold", 0.5)),
        ),
        "segmentation": segmentation_checks(
            files, architectures, config["split"]["folds"], float(seg.get("threshold", 0.5))
        ),
        "paper": paper_comparability(config),
    }


def checks_html(checks: dict[str, Any]) -> str:
    """The report's 'Checks' section: flagged models, and what the ensembles do without them."""
    from html import escape

    items = []
    cls, seg = checks["classification"], checks["segmentation"]
    for d in cls["degenerate"]:
        items.append(f"classifier <b>{escape(d['model'])}</b> {escape(d['reason'])}")
    if (without := cls["ensemble_without_degenerate"]) is not None:
        change = without["changed_slices"]
        before, after = without["with"], without["without"]
        items.append(
            f"without it the ensemble ({escape(', '.join(without['models']))}) "
            + (
                f"would change {change} test decision(s): accuracy {before['accuracy']:.3f}"
                f" → {after['accuracy']:.3f}, tumor F1 "
                f"{before['tumor_f1']:.3f} → {after['tumor_f1']:.3f}"
                if change
                else "would make the same decisions"
            )
        )
    for d in seg["degenerate"]:
        items.append(
            f"segmentation <b>{escape(d['architecture'])} fold {d['fold']}</b>: "
            f"{escape(d['reason'])}"
        )
    for arch, w in seg["ensemble_without_degenerate"].items():
        verb = (
            "would change"
            if abs(w["test_dice_without"] - w["test_dice_with"]) > 5e-4
            else ("would not change")
        )
        items.append(
            f"{escape(arch)} fold ensemble without it (folds {w['folds']}) {verb}: test Dice on "
            f"tumor slices {w['test_dice_with']:.3f} → {w['test_dice_without']:.3f}"
        )
    if not items:
        return (
            "<p class=good>No degenerate model: every classifier predicts both classes and "
            f"every segmentation fold reaches validation Dice ≥ {DEGENERATE_DICE}.</p>"
        )
    return "<ul class=bad>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def paper_note_html(paper: dict[str, Any]) -> str:
    from html import escape

    if paper["comparable"]:
        return "<p class=note>Same data and split level as the paper.</p>"
    return (
        "<p class=bad>Not comparable with the paper: "
        + "; ".join(escape(r) for r in paper["reasons"])
        + ". The paper's column is for orientation only.</p>"
    )
