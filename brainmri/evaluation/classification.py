"""Classification metrics (scikit-learn), the ensemble vote, the Fig. 3 table and error lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainmri.errors import InputError

CLASS_NAMES = ["no_tumor", "tumor"]


PREDICTION_COLUMNS = ["id", "patient", "label", "prob_tumor", "pred"]


def decide(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Tumor (1) / no tumor (0): probability >= the classifier cut-off
    (``classification.threshold``). The one place the cut-off is applied."""
    if not 0 < threshold < 1:
        raise ValueError(f"classifier cut-off {threshold}: must lie strictly between 0 and 1")
    return (np.asarray(probabilities, dtype=float) >= threshold).astype(int)


def read_predictions(path: str | Path, threshold: float | None = None) -> pd.DataFrame:
    """Read a ``test_predictions.csv`` and check it: columns, 0/1 labels, probabilities.

    A single model's file (written by training) holds probabilities only; with ``threshold``
    (the classifier cut-off) its ``pred`` column is made here. An ensemble's file holds the
    vote's ``pred``, which is kept.
    """
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file, expected columns {PREDICTION_COLUMNS}") from None
    needed = PREDICTION_COLUMNS if threshold is None else PREDICTION_COLUMNS[:-1]
    missing = [column for column in needed if column not in frame]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (has {list(frame.columns)})")
    if frame.empty:
        raise InputError(f"{path}: no predictions")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise InputError(f"{path}: duplicate id {duplicated.iloc[0]!r}")
    for column in ("label", "pred") if "pred" in frame else ("label",):
        bad = frame[column][~frame[column].isin([0, 1])]
        if len(bad):
            raise InputError(f"{path}: column {column} must be 0 or 1, found {bad.iloc[0]!r}")
        frame[column] = frame[column].astype(int)
    prob = pd.to_numeric(frame["prob_tumor"], errors="coerce")
    bad = frame["prob_tumor"][prob.isna() | (prob < 0) | (prob > 1)]
    if len(bad):
        raise InputError(f"{path}: prob_tumor must be a number in [0, 1], found {bad.iloc[0]!r}")
    frame["prob_tumor"] = prob.astype(float)
    if "pred" not in frame:
        frame["pred"] = decide(frame["prob_tumor"].to_numpy(), threshold)
    return frame


def vote(
    preds: np.ndarray, probs: np.ndarray, method: str, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ensemble decision of M models over N samples: ``(pred, mean_prob, votes)``.

    majority: the paper's majority vote; a tie (possible with an even number of models) is
    broken by the mean probability (>= ``threshold``, the cut-off -> tumor). soft: mean
    probability >= ``threshold``.
    """
    preds = np.asarray(preds, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if preds.ndim != 2 or preds.shape != probs.shape:
        raise ValueError("preds and probs must both be (models, samples)")
    models = preds.shape[0]
    votes = preds.sum(axis=0)
    mean_prob = probs.mean(axis=0)
    soft = decide(mean_prob, threshold)
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
    from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

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
        "confusion_matrix_layout": "rows: true no_tumor, tumor; columns: predicted",
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


def check_ids_in_manifest(
    ids: pd.Series, manifest: pd.DataFrame, path: str | Path, source: str = "lgg"
) -> None:
    """Every id of a predictions file must be a ``source`` row of the manifest."""
    known = set(manifest.loc[manifest["source"] == source, "id"])
    unknown = [name for name in ids if name not in known]
    if unknown:
        raise InputError(
            f"{path}: {len(unknown)} id(s) are not {source.upper()} slices of the manifest, "
            f"e.g. {unknown[0]!r}"
        )


def classification_errors(
    predictions: pd.DataFrame, limit: int = 8
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Up to ``limit`` false negatives and false positives, the most confident mistakes first."""
    label, pred = predictions["label"], predictions["pred"]
    fn = predictions[(label == 1) & (pred == 0)].sort_values("prob_tumor", kind="stable")
    fp = predictions[(label == 0) & (pred == 1)].sort_values(
        "prob_tumor", ascending=False, kind="stable"
    )
    return fn.head(limit), fp.head(limit)
