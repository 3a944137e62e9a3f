"""Segmentation metrics per slice and per volume: Dice, Jaccard (Dice, Jaccard, and
medpy's Hausdorff distance and ASSD) with documented rules for empty masks, fold summaries.

Empty-mask rules (medpy raises on empty masks), per slice, distances in pixels:

==================  =====  =======  ==================  ==================
case                Dice   Jaccard  HD                  ASSD
==================  =====  =======  ==================  ==================
both empty          1      1        0                   0
one of them empty   0      0        image diagonal      image diagonal
both non-empty      overlap formulas, medpy ``hd`` / ``assd``
==================  =====  =======  ==================  ==================
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from brainmri.evaluation.masks import binarize
from brainmri.evaluation.postprocess import PostProcess, clean_patients
from brainmri.evaluation.sequences import by_sequences

CASES = ("both_empty", "pred_empty_only", "truth_empty_only", "both_nonempty")


SEGMENTATION_METRICS = ("dice", "jaccard", "hd", "assd")


EMPTY_MASK_RULES = {
    "both_empty": "Dice 1, Jaccard 1, HD 0, ASSD 0",
    "one_empty": "Dice 0, Jaccard 0, HD and ASSD = image diagonal (pixels)",
}


# Below this many non-empty slice pairs a process pool costs more than it saves (measured:
# 316 real LGG slices take 0.24 s in one process; see docs/evaluation.md).
PARALLEL_MIN_PAIRS = 256


def overlap_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per slice ``|P∩T|, |P|, |T|`` (int64, shape (N, 3)) of (N, H, W) masks: the sums every
    overlap metric is made of. The reference of the device version
    (brainmri.inference.overlap.overlap_counts_on), which gives the same integers."""
    pred = np.asarray(pred).reshape(len(pred), -1).astype(bool, copy=False)
    truth = np.asarray(truth).reshape(len(truth), -1).astype(bool, copy=False)
    sums = [np.count_nonzero(a, axis=1) for a in (pred & truth, pred, truth)]
    return np.stack(sums, axis=1).astype(np.int64)


def overlap_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and Jaccard from :func:`overlap_counts`; 1 when both masks are empty."""
    intersection = counts[:, 0].astype(np.float64)
    sizes = counts[:, 1] + counts[:, 2].astype(np.float64)
    union = sizes - intersection
    both_empty = sizes == 0
    dice = np.where(both_empty, 1.0, 2 * intersection / np.maximum(sizes, 1))
    jaccard = np.where(both_empty, 1.0, intersection / np.maximum(union, 1))
    return dice, jaccard


def overlap_metrics(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and Jaccard of boolean (N, H, W) arrays, vectorised; 1 when both empty."""
    return overlap_from_counts(overlap_counts(pred, truth))


def _cases(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The empty-mask case of each slice from whether its prediction / truth is non-empty."""
    return np.select(
        [~p & ~t, ~p & t, p & ~t],
        ["both_empty", "pred_empty_only", "truth_empty_only"],
        "both_nonempty",
    )


def slice_cases(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Which empty-mask case each slice falls in (see the module docstring)."""
    return _cases(pred.reshape(len(pred), -1).any(1), truth.reshape(len(truth), -1).any(1))


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
    both = p & t
    return _distances(p, t, pred.shape[1:], pred[both], truth[both], threads)


def _distances(
    p: np.ndarray,
    t: np.ndarray,
    shape: tuple[int, ...],
    pred_both: np.ndarray,
    truth_both: np.ndarray,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """HD and ASSD of each slice from whether its prediction (``p``) and truth (``t``) are
    non-empty, and the masks of the slices where both are (in order)."""
    diagonal = math.hypot(*shape) if len(shape) == 2 else 0.0
    hd = np.where(p == t, 0.0, diagonal)  # both empty: 0, exactly one empty: the diagonal
    assd = hd.copy()
    both = np.flatnonzero(p & t)
    pairs = [_crop_pair(a, b) for a, b in zip(pred_both, truth_both, strict=True)]
    if threads > 1 and len(pairs) > PARALLEL_MIN_PAIRS:
        chunk = max(1, math.ceil(len(pairs) / (4 * threads)))
        with ProcessPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(_medpy_distances, pairs, chunksize=chunk))
    else:
        results = [_medpy_distances(pair) for pair in pairs]
    for i, (h, a) in zip(both, results, strict=True):
        hd[i], assd[i] = h, a
    return hd, assd


def _metrics_frame(counts: np.ndarray, hd: np.ndarray, assd: np.ndarray) -> pd.DataFrame:
    dice, jaccard = overlap_from_counts(counts)
    return pd.DataFrame(
        {
            "dice": dice,
            "jaccard": jaccard,
            "hd": hd,
            "assd": assd,
            "pred_area": counts[:, 1].astype(int),
            "true_area": counts[:, 2].astype(int),
            "case": _cases(counts[:, 1] > 0, counts[:, 2] > 0),
        }
    )


def per_slice_metrics(pred: np.ndarray, truth: np.ndarray, threads: int = 1) -> pd.DataFrame:
    """dice, jaccard, hd, assd, pred_area, true_area and case for each slice."""
    return _metrics_frame(overlap_counts(pred, truth), *distance_metrics(pred, truth, threads))


def _with_rows(rows: pd.DataFrame, frame: pd.DataFrame, split: str) -> pd.DataFrame:
    frame.insert(0, "has_tumor", rows["has_tumor"].to_numpy(dtype=int))
    frame.insert(0, "split", split)
    frame.insert(0, "patient", rows["patient"].to_numpy())
    frame.insert(0, "id", rows["id"].to_numpy())
    return frame


def score_slices(
    rows: pd.DataFrame, pred: np.ndarray, truth: np.ndarray, split: str, threads: int = 1
) -> pd.DataFrame:
    """per_slice.csv rows: id, patient, split, has_tumor, then :func:`per_slice_metrics`."""
    if not (len(rows) == len(pred) == len(truth)):
        raise ValueError(f"{len(rows)} rows, {len(pred)} predictions, {len(truth)} masks")
    return _with_rows(rows, per_slice_metrics(pred, truth, threads), split)


def volume_dice(pred: np.ndarray, truth: np.ndarray, patients: np.ndarray) -> pd.Series:
    """Dice of each patient's stacked slices (Buda et al.); 1 when both volumes are empty."""
    return volume_dice_from_counts(overlap_counts(pred, truth), patients)


def volume_dice_from_counts(counts: np.ndarray, patients: np.ndarray) -> pd.Series:
    """:func:`volume_dice` from the slices' :func:`overlap_counts` (exact integer sums)."""
    patients = np.asarray(patients)
    values = {}
    for patient in sorted(set(patients.tolist())):
        intersection, pred, true = counts[patients == patient].sum(0)
        total = pred + true
        values[patient] = 1.0 if total == 0 else float(2 * intersection / total)
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
    post: PostProcess | None = None,
    counts: np.ndarray | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-slice rows and the report of one set of slices from uint8 stored probabilities,
    thresholded and (with ``post``) cleaned per patient volume.

    ``counts``: the slices' :func:`overlap_counts` of ``binarize(stored, threshold)`` and
    ``truth`` when already computed (on the inference device: evaluate_segmenter.py); then only
    the slices where both masks are non-empty are thresholded here, for HD and ASSD.
    """
    if not (len(rows) == len(stored) == len(truth)):
        raise ValueError(f"{len(rows)} rows, {len(stored)} predictions, {len(truth)} masks")
    truth = np.asarray(truth).astype(bool)
    if counts is None:
        pred = binarize(stored, threshold)
        if post is not None:
            pred = clean_patients(pred, rows, post)
        counts = overlap_counts(pred, truth)
        both = (counts[:, 1] > 0) & (counts[:, 2] > 0)
        pred_both = pred[both]
    else:
        if post is not None:
            raise ValueError("overlap counts are of the masks before post-processing")
        if counts.shape != (len(rows), 3):
            raise ValueError(f"overlap counts of shape {counts.shape} for {len(rows)} slices")
        both = (counts[:, 1] > 0) & (counts[:, 2] > 0)
        pred_both = binarize(stored[both], threshold)
    nonempty = (counts[:, 1] > 0, counts[:, 2] > 0)
    hd, assd = _distances(*nonempty, truth.shape[1:], pred_both, truth[both], threads)
    frame = _with_rows(rows, _metrics_frame(counts, hd, assd), split)
    volume = volume_dice_from_counts(counts, rows["patient"].to_numpy())
    report = segmentation_report(frame, volume)
    report.update(split=split, threshold=threshold, n_slices=len(rows))
    report["by_sequences"] = by_sequences(rows, frame, volume)
    if post is not None:
        report["postprocess"] = post.as_dict()
    return frame, report
