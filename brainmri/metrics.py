"""Metrics: classification (scikit-learn), ensemble votes, segmentation (Dice, Jaccard, and
medpy's Hausdorff distance and ASSD) with documented rules for empty masks.

Empty-mask rules (medpy raises on empty masks), per slice, distances in pixels:

==================  =====  =======  ==================  ==================
case                Dice   Jaccard  HD                  ASSD
==================  =====  =======  ==================  ==================
both empty          1      1        0                   0
one of them empty   0      0        image diagonal      image diagonal
both non-empty      medpy / overlap formulas
==================  =====  =======  ==================  ==================
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from medpy.metric import binary
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

CLASS_NAMES = ["no_tumor", "tumor"]
CASES = ("both_empty", "pred_empty_only", "truth_empty_only", "both_nonempty")


# --- classification -------------------------------------------------------------------------


def vote(
    preds: np.ndarray, probs: np.ndarray, method: str = "majority"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble decision of M models over N samples: ``(pred, mean_prob, votes)``.

    majority: the paper's majority vote; a tie (possible with an even number of models) is
    broken by the mean probability (>= 0.5 -> tumor). soft: mean probability >= 0.5.
    """
    preds = np.asarray(preds, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if preds.ndim != 2 or preds.shape != probs.shape:
        raise ValueError("preds and probs must both be (models, samples)")
    models = preds.shape[0]
    votes = preds.sum(axis=0)
    mean_prob = probs.mean(axis=0)
    soft = (mean_prob >= 0.5).astype(int)
    if method == "soft":
        return soft, mean_prob, votes
    if method != "majority":
        raise ValueError(f"unknown ensemble method {method!r} (majority or soft)")
    pred = np.where(2 * votes > models, 1, np.where(2 * votes < models, 0, soft))
    return pred.astype(int), mean_prob, votes


def classification_metrics(
    labels: np.ndarray, preds: np.ndarray, probs: np.ndarray
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro/weighted averages, ROC AUC, CM."""
    labels = np.asarray(labels, dtype=int)
    preds = np.asarray(preds, dtype=int)
    report = classification_report(
        labels, preds, labels=[0, 1], target_names=CLASS_NAMES, output_dict=True, zero_division=0
    )
    matrix = confusion_matrix(labels, preds, labels=[0, 1])
    auc = roc_auc_score(labels, probs) if len(set(labels.tolist())) == 2 else None
    return {
        "n": len(labels),
        "accuracy": float(np.mean(labels == preds)) if len(labels) else None,
        "classes": {name: {k: float(v) for k, v in report[name].items()} for name in CLASS_NAMES},
        "macro_avg": {k: float(v) for k, v in report["macro avg"].items()},
        "weighted_avg": {k: float(v) for k, v in report["weighted avg"].items()},
        "roc_auc": None if auc is None else float(auc),
        "roc_auc_note": None if auc is not None else "undefined: only one class in the test set",
        "confusion_matrix": matrix.tolist(),
        "false_negatives": int(matrix[1, 0]),
        "false_positives": int(matrix[0, 1]),
    }


def fig3_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """The paper's Fig. 3 layout: rows per class, accuracy, macro and weighted averages."""
    rows = []
    for name in CLASS_NAMES:
        c = metrics["classes"][name]
        rows.append([name, c["precision"], c["recall"], c["f1-score"], int(c["support"])])
    rows.append(["accuracy", None, None, metrics["accuracy"], metrics["n"]])
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        c = metrics[key]
        rows.append([label, c["precision"], c["recall"], c["f1-score"], int(c["support"])])
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1-score", "support"])


# --- segmentation ---------------------------------------------------------------------------


def overlap_metrics(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and Jaccard of boolean (N, H, W) arrays, vectorised; 1 when both empty."""
    pred = pred.reshape(len(pred), -1).astype(bool)
    truth = truth.reshape(len(truth), -1).astype(bool)
    intersection = np.logical_and(pred, truth).sum(1).astype(np.float64)
    sizes = pred.sum(1) + truth.sum(1).astype(np.float64)
    union = sizes - intersection
    both_empty = sizes == 0
    dice = np.where(both_empty, 1.0, 2 * intersection / np.maximum(sizes, 1))
    jaccard = np.where(both_empty, 1.0, intersection / np.maximum(union, 1))
    return dice, jaccard


def slice_cases(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Which empty-mask case each slice falls in (see the module docstring)."""
    p = pred.reshape(len(pred), -1).any(1)
    t = truth.reshape(len(truth), -1).any(1)
    return np.select(
        [~p & ~t, ~p & t, p & ~t],
        ["both_empty", "pred_empty_only", "truth_empty_only"],
        "both_nonempty",
    )


def _distances(pair: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    pred, truth = pair
    p, t = pred.any(), truth.any()
    if not p and not t:
        return 0.0, 0.0
    if not p or not t:
        diagonal = math.hypot(*pred.shape)
        return diagonal, diagonal
    return float(binary.hd(pred, truth)), float(binary.assd(pred, truth))


def distance_metrics(
    pred: np.ndarray, truth: np.ndarray, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Hausdorff distance and ASSD (medpy, pixels), in parallel over ``threads``."""
    pairs = list(zip(pred.astype(bool), truth.astype(bool), strict=True))
    nonempty = sum(1 for p, t in pairs if p.any() and t.any())
    if threads > 1 and nonempty > 32:
        with ProcessPoolExecutor(max_workers=threads) as pool:
            results = list(
                pool.map(_distances, pairs, chunksize=max(1, len(pairs) // (4 * threads)))
            )
    else:
        results = [_distances(pair) for pair in pairs]
    if not results:
        return np.zeros(0), np.zeros(0)
    hd, assd = (np.asarray(column, dtype=np.float64) for column in zip(*results, strict=True))
    return hd, assd


def per_slice_metrics(pred: np.ndarray, truth: np.ndarray, threads: int = 1) -> pd.DataFrame:
    """dice, jaccard, hd, assd, pred_area, true_area and case for each slice."""
    dice, jaccard = overlap_metrics(pred, truth)
    hd, assd = distance_metrics(pred, truth, threads)
    return pd.DataFrame(
        {
            "dice": dice,
            "jaccard": jaccard,
            "hd": hd,
            "assd": assd,
            "pred_area": pred.reshape(len(pred), -1).sum(1).astype(int),
            "true_area": truth.reshape(len(truth), -1).sum(1).astype(int),
            "case": slice_cases(pred, truth),
        }
    )


def volume_dice(pred: np.ndarray, truth: np.ndarray, patients: np.ndarray) -> pd.Series:
    """Dice of each patient's stacked slices (Buda et al.); 1 when both volumes are empty."""
    patients = np.asarray(patients)
    values = {}
    for patient in sorted(set(patients.tolist())):
        rows = patients == patient
        p, t = pred[rows].astype(bool), truth[rows].astype(bool)
        total = p.sum() + t.sum()
        values[patient] = 1.0 if total == 0 else float(2 * np.logical_and(p, t).sum() / total)
    return pd.Series(values, name="volume_dice", dtype=np.float64)


def summarize_slices(frame: pd.DataFrame) -> dict[str, Any]:
    """Mean and std of each metric over the slices of ``frame`` and the empty-case counts."""
    summary: dict[str, Any] = {"n_slices": len(frame)}
    for metric in ("dice", "jaccard", "hd", "assd"):
        values = frame[metric].to_numpy(dtype=np.float64)
        summary[metric] = {
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std()) if len(values) else None,
        }
    summary["cases"] = {case: int((frame["case"] == case).sum()) for case in CASES}
    return summary


def segmentation_report(frame: pd.DataFrame, volume: pd.Series) -> dict[str, Any]:
    """Metrics on tumor-containing slices (the paper), on all slices, and per-patient volumes."""
    return {
        "tumor_slices": summarize_slices(frame[frame["has_tumor"] == 1]),
        "all_slices": summarize_slices(frame),
        "volume_dice": {
            "mean": float(volume.mean()) if len(volume) else None,
            "std": float(volume.std(ddof=0)) if len(volume) else None,
            "patients": {str(k): float(v) for k, v in volume.items()},
        },
        "empty_mask_rules": {
            "both_empty": "Dice 1, Jaccard 1, HD 0, ASSD 0",
            "one_empty": "Dice 0, Jaccard 0, HD and ASSD = image diagonal (pixels)",
        },
    }


def mean_std(values: list[float | None]) -> dict[str, float | None]:
    """Mean and (population) std over folds, ignoring missing values."""
    clean = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(clean):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(clean.mean()), "std": float(clean.std()), "n": len(clean)}
