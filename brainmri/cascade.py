"""The classify-then-segment cascade: the classifier ensemble gates the segmentation ensemble."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from brainmri.metrics import per_slice_metrics, volume_dice


def detection(pred_positive: np.ndarray, has_tumor: np.ndarray) -> dict[str, Any]:
    """Slice-level detection: sensitivity, specificity and false-positive slices."""
    truth = has_tumor.astype(bool)
    pred = pred_positive.astype(bool)
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
    pred: np.ndarray, truth: np.ndarray, rows: pd.DataFrame, threads: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-slice metrics on the whole test set, volume Dice and detection of one mask set."""
    frame = per_slice_metrics(pred, truth, threads)
    frame.insert(0, "has_tumor", rows["has_tumor"].to_numpy())
    frame.insert(0, "id", rows["id"].to_numpy())
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
        "detection": detection(pred.reshape(len(pred), -1).any(1), frame["has_tumor"].to_numpy()),
        "cases": frame["case"].value_counts().to_dict(),
    }
    return frame, summary


def run_cascade(
    gate: np.ndarray,
    probabilities: np.ndarray,
    truth: np.ndarray,
    rows: pd.DataFrame,
    threshold: float,
    threads: int = 1,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Compare the segmentation ensemble alone with the cascade (masks only where ``gate``)."""
    seg_only = probabilities >= threshold
    cascade = seg_only & gate.astype(bool)[:, None, None]
    alone_frame, alone = evaluate_masks(seg_only, truth, rows, threads)
    cascade_frame, gated = evaluate_masks(cascade, truth, rows, threads)
    truth_area = truth.reshape(len(truth), -1).sum(1)
    dropped = (~gate.astype(bool)) & (truth_area > 0)
    found_there = np.logical_and(seg_only[dropped], truth[dropped]).sum()
    gated["gate"] = {
        "slices_called_tumor": int(gate.sum()),
        "tumor_slices_dropped": int(dropped.sum()),
        "tumor_area_lost_fraction": float(truth_area[dropped].sum() / max(truth_area.sum(), 1)),
        "tumor_pixels_lost": int(truth_area[dropped].sum()),
        "tumor_pixels_segmentation_found_on_dropped_slices": int(found_there),
    }
    per_slice = cascade_frame.rename(
        columns=lambda c: c if c in ("id", "has_tumor") else f"cascade_{c}"
    )
    per_slice["gate"] = gate.astype(int)
    for column in ("dice", "pred_area", "case"):
        per_slice[f"segmentation_{column}"] = alone_frame[column].to_numpy()
    return per_slice, {"segmentation_only": alone, "cascade": gated}


def comparison_table(results: dict[str, Any]) -> pd.DataFrame:
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
                "hd (all)": r["hd_all_slices"],
                "assd (all)": r["assd_all_slices"],
            }
        )
    return pd.DataFrame(rows)
