"""The classify-then-segment cascade: the classifier ensemble gates the segmentation ensemble.

Every LGG test slice the classifier calls ``tumor`` gets the segmentation fold ensemble's mask;
every other slice an empty mask (:func:`brainmri.evaluation.decision.gate`, as in ``predict`` and
``predict_volume``). Both pipelines are scored on the whole test set (tumor and
tumor-free slices) with the empty-mask rules of :mod:`brainmri.metrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainmri.errors import InputError
from brainmri.evaluation.decision import gate as gate_masks
from brainmri.evaluation.segmentation import CASES, score_slices, volume_dice


def gate_from_classifier(
    decisions: pd.DataFrame, rows: pd.DataFrame, path: str | Path
) -> np.ndarray:
    """The classifier's 0/1 ``pred`` for each of ``rows`` (by id), as booleans."""
    by_id = decisions.set_index("id")
    missing = [name for name in rows["id"] if name not in by_id.index]
    if missing:
        raise InputError(
            f"{path}: no decision for {len(missing)} of the {len(rows)} test slices, "
            f"e.g. {missing[0]!r}"
        )
    return by_id.loc[rows["id"], "pred"].to_numpy().astype(bool)


def detection(pred_positive: np.ndarray, has_tumor: np.ndarray) -> dict[str, Any]:
    """Slice-level detection: a slice is called positive when its mask is not empty."""
    truth = np.asarray(has_tumor).astype(bool)
    pred = np.asarray(pred_positive).astype(bool)
    tp, fn = int((pred & truth).sum()), int((~pred & truth).sum())
    tn, fp = int((~pred & ~truth).sum()), int((pred & ~truth).sum())
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "false_positive_slices": fp,
        "false_negative_slices": fn,
        "true_positive_slices": tp,
        "true_negative_slices": tn,
    }


def evaluate_masks(
    pred: np.ndarray, truth: np.ndarray, rows: pd.DataFrame, threads: int = 1
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-slice metrics on the whole test set, volume Dice and detection of one mask set."""
    frame = score_slices(rows, pred, truth, "test", threads)
    volume = volume_dice(pred, truth, rows["patient"].to_numpy())
    tumor = frame[frame["has_tumor"] == 1]
    summary = {
        "dice_all_slices": float(frame["dice"].mean()),
        "dice_tumor_slices": float(tumor["dice"].mean()) if len(tumor) else None,
        "jaccard_all_slices": float(frame["jaccard"].mean()),
        "hd_all_slices": float(frame["hd"].mean()),
        "assd_all_slices": float(frame["assd"].mean()),
        "volume_dice": float(volume.mean()),
        "volume_dice_std": float(volume.std(ddof=0)),
        "detection": detection(frame["pred_area"].to_numpy() > 0, frame["has_tumor"].to_numpy()),
        "cases": {case: int((frame["case"] == case).sum()) for case in CASES},
    }
    return frame, summary


def run_cascade(
    gate: np.ndarray,
    seg_masks: np.ndarray,
    truth: np.ndarray,
    rows: pd.DataFrame,
    threads: int = 1,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score the segmentation masks alone and gated by ``gate`` (True: the classifier says
    tumor); also what the gate cost: tumor slices it dropped and their tumor area."""
    gate = np.asarray(gate).astype(bool)
    seg_masks = np.asarray(seg_masks).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if not (len(gate) == len(seg_masks) == len(truth) == len(rows)):
        raise ValueError(
            f"{len(gate)} decisions, {len(seg_masks)} masks, {len(truth)} truths, {len(rows)} rows"
        )
    cascade = gate_masks(seg_masks, gate)
    alone_frame, alone = evaluate_masks(seg_masks, truth, rows, threads)
    cascade_frame, gated = evaluate_masks(cascade, truth, rows, threads)
    truth_area = truth.reshape(len(truth), -1).sum(1)
    dropped = ~gate & (truth_area > 0)
    total = int(truth_area.sum())
    lost = int(truth_area[dropped].sum())
    found = int(np.logical_and(seg_masks[dropped], truth[dropped]).sum())
    gated["gate"] = {
        "slices_called_tumor": int(gate.sum()),
        "tumor_slices": int((truth_area > 0).sum()),
        "tumor_slices_dropped": int(dropped.sum()),
        "tumor_pixels_total": total,
        "tumor_pixels_lost": lost,
        "tumor_area_lost_fraction": lost / total if total else 0.0,
        "tumor_pixels_segmentation_found_on_dropped_slices": found,
        "tumor_area_segmentation_found_on_dropped_fraction": found / total if total else 0.0,
        "false_positive_slices_removed": int(
            alone["detection"]["false_positive_slices"]
            - gated["detection"]["false_positive_slices"]
        ),
    }
    per_slice = cascade_frame.drop(columns=["split"]).rename(
        columns=lambda c: c if c in ("id", "patient", "has_tumor") else f"cascade_{c}"
    )
    per_slice.insert(3, "gate", gate.astype(int))
    for column in ("dice", "pred_area", "case"):
        per_slice[f"segmentation_{column}"] = alone_frame[column].to_numpy()
    return per_slice, {"segmentation_only": alone, "cascade": gated}


def comparison_table(results: dict[str, Any]) -> pd.DataFrame:
    """comparison.tsv: one row per pipeline (segmentation only, cascade), the metrics as columns."""
    rows = []
    for name, key in (("segmentation only", "segmentation_only"), ("cascade", "cascade")):
        r = results[key]
        rows.append(
            {
                "pipeline": name,
                "dice (all test slices)": r["dice_all_slices"],
                "dice (tumor slices)": r["dice_tumor_slices"],
                "volume dice": r["volume_dice"],
                "sensitivity": r["detection"]["sensitivity"],
                "specificity": r["detection"]["specificity"],
                "false-positive slices": r["detection"]["false_positive_slices"],
                "missed tumor slices": r["detection"]["false_negative_slices"],
                "hd (all, px)": r["hd_all_slices"],
                "assd (all, px)": r["assd_all_slices"],
            }
        )
    return pd.DataFrame(rows)
