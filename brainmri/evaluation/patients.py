"""Per-patient segmentation metrics comparable with the literature (the quality benchmark).

For each patient (its slices stacked in ``slice_index`` order):

* ``dice_tumor_slices``: mean per-slice Dice over its slices with tumor (the paper's slice
  metric, per patient);
* ``volume_dice``: Dice of the stacked volume (1 when both volumes are empty);
* ``buda_volume_dice``: Buda et al.'s per-volume Dice: the thresholded volume reduced to its
  largest 3-D connected component (medpy's ``largest_connected_component``, 6-connectivity, as
  their ``dsc(..., lcc=True)``), then Dice with the true volume;
* ``hd95``: mean over its tumor slices where prediction and truth are both non-empty of the
  2-D 95th-percentile Hausdorff distance (medpy ``hd95``), in pixels of the evaluated grid
  (NaN when no such slice);
* ``missed_tumor_slices`` / ``slice_sensitivity``: tumor slices with an empty prediction, and
  the share of tumor slices with a non-empty one;
* ``false_positive_slices``: slices without tumor where something was predicted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PATIENT_METRICS = (
    "dice_tumor_slices",
    "volume_dice",
    "buda_volume_dice",
    "hd95",
    "slice_sensitivity",
)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays of any shape; 1 when both are empty."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def largest_component(volume: np.ndarray) -> np.ndarray:
    """The largest 3-D connected component of a boolean volume (medpy, as Buda et al.)."""
    from medpy.filter.binary import largest_connected_component

    volume = np.asarray(volume, dtype=bool)
    if not volume.any():
        return volume
    return np.asarray(largest_connected_component(volume), dtype=bool)


def buda_volume_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Buda et al.'s per-volume Dice: largest component of the prediction, then Dice."""
    return dice(largest_component(pred), truth)


def hd95_slice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2-D HD95 (pixels) of two non-empty masks; NaN when either is empty."""
    from medpy.metric import binary

    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not pred.any() or not truth.any():
        return float("nan")
    return float(binary.hd95(pred, truth))


def patient_metrics(pred: np.ndarray, truth: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (index: patient, sorted) of boolean (N, H, W) ``pred`` and ``truth``
    aligned with ``rows`` (``patient``, ``slice_index``): the metrics of the module docstring
    plus ``slices``, ``tumor_slices`` and ``missing_modalities`` (when ``rows`` has it)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not (len(pred) == len(truth) == len(rows)):
        raise ValueError(f"{len(rows)} rows, {len(pred)} predictions, {len(truth)} masks")
    patients = rows["patient"].to_numpy()
    order = rows["slice_index"].to_numpy()
    records = {}
    for patient in sorted(set(patients.tolist())):
        at = np.flatnonzero(patients == patient)
        at = at[np.argsort(order[at], kind="stable")]
        p, t = pred[at], truth[at]
        has_pred = p.reshape(len(p), -1).any(1)
        has_tumor = t.reshape(len(t), -1).any(1)
        tumor = np.flatnonzero(has_tumor)
        slice_dice = [dice(p[i], t[i]) for i in tumor]
        distances = [hd95_slice(p[i], t[i]) for i in tumor if has_pred[i]]
        record = {
            "slices": len(at),
            "tumor_slices": len(tumor),
            "dice_tumor_slices": float(np.mean(slice_dice)) if len(tumor) else float("nan"),
            "volume_dice": dice(p, t),
            "buda_volume_dice": buda_volume_dice(p, t),
            "hd95": float(np.mean(distances)) if distances else float("nan"),
            "missed_tumor_slices": int((has_tumor & ~has_pred).sum()),
            "slice_sensitivity": float(has_pred[tumor].mean()) if len(tumor) else float("nan"),
            "false_positive_slices": int((~has_tumor & has_pred).sum()),
        }
        if "missing_modalities" in rows:
            record["missing_modalities"] = str(rows["missing_modalities"].iloc[at[0]] or "")
        records[patient] = record
    frame = pd.DataFrame.from_dict(records, orient="index")
    frame.index.name = "patient"
    return frame
