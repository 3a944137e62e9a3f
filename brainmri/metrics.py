"""Metrics: classification (scikit-learn), ensemble votes, segmentation (Dice, Jaccard, and
medpy's Hausdorff distance and ASSD) with documented rules for empty masks, fold summaries.

Empty-mask rules (medpy raises on empty masks), per slice, distances in pixels:

==================  =====  =======  ==================  ==================
case                Dice   Jaccard  HD                  ASSD
==================  =====  =======  ==================  ==================
both empty          1      1        0                   0
one of them empty   0      0        image diagonal      image diagonal
both non-empty      overlap formulas, medpy ``hd`` / ``assd``
==================  =====  =======  ==================  ==================

Probabilities travel between scripts as uint8 (probability x 255, rounded); every script turns
them into masks with :func:`binarize`, so a mask is the same wherever it is computed.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainmri.io import InputError

# scikit-learn and medpy (which imports scipy.stats) are imported where they are used: a script
# that needs neither starts seconds faster.

CLASS_NAMES = ["no_tumor", "tumor"]
CASES = ("both_empty", "pred_empty_only", "truth_empty_only", "both_nonempty")
PREDICTION_COLUMNS = ["id", "patient", "label", "prob_tumor", "pred"]
SEGMENTATION_METRICS = ("dice", "jaccard", "hd", "assd")
EMPTY_MASK_RULES = {
    "both_empty": "Dice 1, Jaccard 1, HD 0, ASSD 0",
    "one_empty": "Dice 0, Jaccard 0, HD and ASSD = image diagonal (pixels)",
}
# Below this many non-empty slice pairs a process pool costs more than it saves (measured:
# 316 real LGG slices take 0.24 s in one process; see docs/evaluation.md).
PARALLEL_MIN_PAIRS = 256


# --- classification -------------------------------------------------------------------------


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a ``test_predictions.csv`` and check it: columns, 0/1 labels, probabilities."""
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file, expected columns {PREDICTION_COLUMNS}") from None
    missing = [column for column in PREDICTION_COLUMNS if column not in frame]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (has {list(frame.columns)})")
    if frame.empty:
        raise InputError(f"{path}: no predictions")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise InputError(f"{path}: duplicate id {duplicated.iloc[0]!r}")
    for column in ("label", "pred"):
        bad = frame[column][~frame[column].isin([0, 1])]
        if len(bad):
            raise InputError(f"{path}: column {column} must be 0 or 1, found {bad.iloc[0]!r}")
        frame[column] = frame[column].astype(int)
    prob = pd.to_numeric(frame["prob_tumor"], errors="coerce")
    bad = frame["prob_tumor"][prob.isna() | (prob < 0) | (prob > 1)]
    if len(bad):
        raise InputError(f"{path}: prob_tumor must be a number in [0, 1], found {bad.iloc[0]!r}")
    frame["prob_tumor"] = prob.astype(float)
    return frame


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


def ensemble_predictions(
    frames: dict[str, pd.DataFrame], method: str = "majority"
) -> tuple[pd.DataFrame, int]:
    """Vote of the models' prediction tables (``{file name: frame}``): the table and the ties.

    Every table must hold the same ids in the same order with the same labels; the result has
    a backbone's columns (``prob_tumor`` = the mean probability) plus ``votes``.
    """
    if not frames:
        raise ValueError("no predictions to ensemble")
    (first_name, reference), *others = frames.items()
    for name, frame in others:
        if (
            len(frame) != len(reference)
            or not (frame["id"].to_numpy() == reference["id"].to_numpy()).all()
        ):
            raise InputError(
                f"{name}: its ids differ from those of {first_name} "
                "(every model must predict the same test rows in the same order)"
            )
        if not (frame["label"].to_numpy() == reference["label"].to_numpy()).all():
            raise InputError(f"{name}: its labels differ from those of {first_name}")
    preds = np.stack([frame["pred"].to_numpy() for frame in frames.values()])
    probs = np.stack([frame["prob_tumor"].to_numpy() for frame in frames.values()])
    pred, mean_prob, votes = vote(preds, probs, method)
    ties = int((2 * votes == len(frames)).sum()) if method == "majority" else 0
    result = reference[["id", "patient", "label"]].assign(
        prob_tumor=np.round(mean_prob, 6), pred=pred, votes=votes
    )
    return result.reset_index(drop=True), ties


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


# --- segmentation: probabilities and masks --------------------------------------------------


def quantize(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 (probability x 255, rounded), the stored form."""
    return np.round(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)


def binarize(stored: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 stored probabilities -> boolean masks (value / 255 >= threshold)."""
    if stored.dtype != np.uint8:
        raise ValueError(f"stored probabilities must be uint8, not {stored.dtype}")
    table = np.arange(256) / 255.0 >= threshold
    return table[stored]


def mean_probabilities(stored: list[np.ndarray]) -> np.ndarray:
    """The fold ensemble: mean of uint8 stored probabilities, rounded back to uint8 (exact:
    an integer sum divided once, so the result does not depend on the order of the folds)."""
    if not stored:
        raise ValueError("no probabilities to average")
    total = np.zeros(stored[0].shape, dtype=np.int32)
    for array in stored:
        if array.shape != total.shape:
            raise ValueError(f"probability arrays differ in shape: {array.shape} vs {total.shape}")
        total += array
    return np.round(total / len(stored)).astype(np.uint8)


def load_probabilities(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a ``test_probabilities.npy`` and check it is uint8 of ``shape``."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npy file ({error})") from None
    if array.dtype != np.uint8 or array.shape != tuple(shape):
        raise InputError(
            f"{path}: expected uint8 probabilities of shape {tuple(shape)} (test slices, S, S), "
            f"found {array.dtype} {array.shape}"
        )
    return array


def load_masks(path: str | Path, rows: pd.DataFrame) -> np.ndarray:
    """Boolean masks of ``rows`` (manifest rows of LGG slices) from ``data/lgg/masks.npy``."""
    try:
        masks = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npy file ({error})") from None
    if masks.ndim != 3:
        raise InputError(f"{path}: expected masks of shape (N, S, S), found {masks.shape}")
    index = rows["array_index"].to_numpy(dtype=int)
    if len(index) and (index.min() < 0 or index.max() >= len(masks)):
        raise InputError(
            f"{path}: holds {len(masks)} masks, the manifest refers to row {index.max()}"
        )
    return np.asarray(masks[index]).astype(bool)


# --- segmentation: per-slice metrics --------------------------------------------------------


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


def _crop_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two non-empty masks cut to their joint bounding box. HD and ASSD do not change: every
    surface pixel is inside the box, and outside it both masks are empty, as medpy's erosion
    takes the image border to be; it is far cheaper for a small tumor in a large image."""
    union = pred | truth
    rows = np.flatnonzero(union.any(1))
    cols = np.flatnonzero(union.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return pred[box], truth[box]


def _medpy_distances(pair: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """medpy's Hausdorff distance and ASSD of two non-empty masks."""
    from medpy.metric import binary

    pred, truth = pair
    return float(binary.hd(pred, truth)), float(binary.assd(pred, truth))


def distance_metrics(
    pred: np.ndarray, truth: np.ndarray, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Hausdorff distance and ASSD (medpy, pixels) with the empty-mask rules.

    Slices where both masks are non-empty go to medpy, in a process pool of ``threads``
    workers (chunked) when there are enough of them.
    """
    pred = np.asarray(pred).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    n = len(pred)
    p = pred.reshape(n, -1).any(1)
    t = truth.reshape(n, -1).any(1)
    diagonal = math.hypot(*pred.shape[1:]) if pred.ndim == 3 else 0.0
    hd = np.where(p == t, 0.0, diagonal)  # both empty: 0, exactly one empty: the diagonal
    assd = hd.copy()
    both = np.flatnonzero(p & t)
    pairs = [_crop_pair(pred[i], truth[i]) for i in both]
    if threads > 1 and len(pairs) > PARALLEL_MIN_PAIRS:
        chunk = max(1, math.ceil(len(pairs) / (4 * threads)))
        with ProcessPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(_medpy_distances, pairs, chunksize=chunk))
    else:
        results = [_medpy_distances(pair) for pair in pairs]
    for i, (h, a) in zip(both, results, strict=True):
        hd[i], assd[i] = h, a
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


def score_slices(
    rows: pd.DataFrame, pred: np.ndarray, truth: np.ndarray, split: str, threads: int = 1
) -> pd.DataFrame:
    """per_slice.csv rows: id, patient, split, has_tumor, then :func:`per_slice_metrics`."""
    if not (len(rows) == len(pred) == len(truth)):
        raise ValueError(f"{len(rows)} rows, {len(pred)} predictions, {len(truth)} masks")
    frame = per_slice_metrics(pred, truth, threads)
    frame.insert(0, "has_tumor", rows["has_tumor"].to_numpy(dtype=int))
    frame.insert(0, "split", split)
    frame.insert(0, "patient", rows["patient"].to_numpy())
    frame.insert(0, "id", rows["id"].to_numpy())
    return frame


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
    for metric in SEGMENTATION_METRICS:
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
        "empty_mask_rules": EMPTY_MASK_RULES,
        "std": "population standard deviation (ddof=0) over slices or patients",
    }


def evaluate_split(
    rows: pd.DataFrame,
    stored: np.ndarray,
    truth: np.ndarray,
    threshold: float,
    split: str,
    threads: int = 1,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-slice rows and the report of one set of slices from uint8 stored probabilities."""
    pred = binarize(stored, threshold)
    frame = score_slices(rows, pred, truth, split, threads)
    report = segmentation_report(frame, volume_dice(pred, truth, rows["patient"].to_numpy()))
    report.update(split=split, threshold=threshold, n_slices=len(rows))
    return frame, report


# --- summaries over folds -------------------------------------------------------------------


def mean_std(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and (population) std over folds, ignoring missing values."""
    clean = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(clean):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(clean.mean()), "std": float(clean.std()), "n": len(clean)}


def fold_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over folds of each fold's mean, on tumor slices, all slices, and volumes;
    empty-case counts summed over the folds."""
    summary: dict[str, Any] = {}
    for scope in ("tumor_slices", "all_slices"):
        summary[scope] = {
            m: mean_std([r[scope][m]["mean"] for r in reports]) for m in SEGMENTATION_METRICS
        }
        summary[scope]["cases"] = {
            case: int(sum(r[scope]["cases"][case] for r in reports)) for case in CASES
        }
        summary[scope]["n_slices"] = int(sum(r[scope]["n_slices"] for r in reports))
    summary["volume_dice"] = mean_std([r["volume_dice"]["mean"] for r in reports])
    return summary


def _pm(value: dict[str, Any]) -> str:
    if value.get("mean") is None:
        return ""
    if value.get("std") is None:
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


TABLE_COLUMNS = [
    "model",
    "dice",
    "jaccard",
    "hd (px)",
    "assd (px)",
    "dice (all slices)",
    "volume dice",
]


def table_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A row of Tables 1/2: mean ± std over folds (tumor slices), all-slice and volume Dice."""
    tumor = summary["tumor_slices"]
    return {
        "model": name,
        "dice": _pm(tumor["dice"]),
        "jaccard": _pm(tumor["jaccard"]),
        "hd (px)": _pm(tumor["hd"]),
        "assd (px)": _pm(tumor["assd"]),
        "dice (all slices)": _pm(summary["all_slices"]["dice"]),
        "volume dice": _pm(summary["volume_dice"]),
    }


def ensemble_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """Table 2's row of a fold ensemble (one model: means over the test slices, no ± std)."""
    single = {
        "tumor_slices": {
            m: {"mean": report["tumor_slices"][m]["mean"]} for m in SEGMENTATION_METRICS
        },
        "all_slices": {"dice": {"mean": report["all_slices"]["dice"]["mean"]}},
        "volume_dice": {"mean": report["volume_dice"]["mean"]},
    }
    return table_row(f"{name} (fold ensemble)", single)


def select_overlay_slices(
    frame: pd.DataFrame, count: int, seed: int, extremes: int = 2
) -> list[int]:
    """Positions of ``count`` slices for the overlay figure: the ``extremes`` lowest-Dice
    tumor slices (failures), the ``extremes`` highest (successes), then a seeded random draw
    of the other tumor slices; in that order. Falls back to all slices without tumors."""
    pool = frame.reset_index(drop=True)
    tumor = pool[pool["has_tumor"] == 1]
    if tumor.empty:
        tumor = pool
    ranked = tumor.sort_values(["dice", "id"], kind="stable").index.tolist()
    worst = ranked[: min(extremes, count)]
    best = [i for i in reversed(ranked) if i not in worst][
        : max(0, min(extremes, count - len(worst)))
    ]
    rest = [i for i in ranked if i not in worst and i not in best]
    need = max(0, min(len(rest), count - len(worst) - len(best)))
    drawn = np.random.default_rng(seed).choice(rest, size=need, replace=False) if need else []
    return worst + best + sorted(int(i) for i in drawn)
