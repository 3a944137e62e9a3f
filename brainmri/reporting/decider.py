"""Which detector decided the run's ensemble (and so gated the cascade), in one sentence of the
report beside the paper's accuracy and tumor F1.

``classification.ensemble`` majority or soft: the backbones' vote, with the segmentation voter
(``k`` from the run's ``classification/segvoter/min_pixels.json``) as one more voter when it is
on; ``segmentation``: the voter alone, and then the backbones' majority vote (the paper's rule,
with the run's smoothing) is recomputed from their test predictions, so that the report still
says what the classifiers would have decided.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from brainmri.evaluation.classification import read_predictions
from brainmri.evaluation.decision import ensemble_predictions, read_voter_choice
from brainmri.reporting.checks import accuracy_f1
from brainmri.reporting.inputs import ReportFiles
from brainmri.tables import read_manifest


def classifiers_majority(
    predictions: dict[str, Path], cutoff: float, smooth_window: int, manifest: Path
) -> dict[str, float]:
    """Accuracy and tumor F1 of the backbones' majority vote (no segmentation voter), smoothed
    along the slice order as the run smooths (the manifest's slice numbers)."""
    frames = {name: read_predictions(path, cutoff) for name, path in predictions.items()}
    first = next(iter(frames.values()))
    order = None
    if smooth_window > 1:
        slices = read_manifest(manifest).set_index("id")["slice_index"]
        order = (first["patient"].to_numpy(), slices.loc[first["id"]].to_numpy())
    result, _ = ensemble_predictions(
        frames, "majority", cutoff, smooth_window=smooth_window, order=order
    )
    return accuracy_f1(result["label"].to_numpy(), result["pred"].to_numpy())


def decided_by(files: ReportFiles, config: dict[str, Any], backbones: list[str]) -> dict:
    """metrics.json's ``decision``: the method, the voter's k (None: off), the sentence's
    detector and, with method segmentation, the backbones' majority vote."""
    cls = config["classification"]
    method, window = cls.get("ensemble", "majority"), int(cls.get("smooth_window", 1))
    k = None  # the voter's k: given by the report rule when the voter is on
    if cls.get("segmentation_voter", {}).get("enabled") or "voter_choice" in files.files:
        k = read_voter_choice(files.path("voter_choice"))
    voter = f"segmentation voter (k={k})"
    majority = None
    if method == "segmentation":
        detector = f"{voter} alone"
        majority = classifiers_majority(
            {b: files.path("predictions", b) for b in backbones},
            float(cls.get("threshold", 0.5)),
            window,
            files.path("manifest"),
        )
    else:
        detector = f"{method} vote of {', '.join(backbones)}"
        detector += f" + {voter}" if k is not None else ""
    if window > 1:
        detector += f", smoothed along the slice order (window {window})"
    return {
        "method": method,
        "min_pixels": k,
        "detector": detector,
        "classifiers_majority": majority,
    }


def decided_by_html(decision: dict, ensemble: dict[str, Any], paper: dict[str, float]) -> str:
    """The sentence: the deciding detector, the backbones' majority vote when they did not
    decide, and the decision's accuracy and tumor F1 beside the paper's."""
    text = f"<b>Decided by:</b> {escape(decision['detector'])}"
    if (majority := decision["classifiers_majority"]) is not None:
        text += (
            f"; the classifiers' majority vote: accuracy {majority['accuracy']:.3f}, "
            f"tumor F1 {majority['tumor_f1']:.3f}"
        )
    acc, f1 = ensemble["accuracy"], ensemble["tumor_f1"]
    text += (
        f". Its accuracy {acc:.3f} ({acc - paper['ensemble_accuracy']:+.3f} vs the paper's "
        f"{paper['ensemble_accuracy']:.2f}), tumor F1 {f1:.3f} "
        f"({f1 - paper['tumor_f1']:+.3f} vs {paper['tumor_f1']:.2f})."
    )
    return f"<p>{text}</p>"
