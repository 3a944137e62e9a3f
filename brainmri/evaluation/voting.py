"""The segmentation fold ensemble as a classifier voter, and smoothing of slice decisions.

Voter (``classification.segmentation_voter``): a slice is called tumor when the ensemble's
thresholded, per-volume post-processed mask has at least ``k`` pixels. ``k`` is a config value,
or (null) the one that classifies the out-of-fold validation slices best (each training patient
predicted by the fold model that did not train on it). Its table has a backbone's columns, so
the classifier ensemble counts it as one more vote (its ``prob_tumor`` is its 0/1 decision).

Smoothing (``classification.smooth_window``): each slice's decision becomes the majority of
the ``w`` decisions centred on it along its patient's slice order (``w`` odd; at a volume's
ends the window is cut to the slices that exist; 1 = off, the paper).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainmri.evaluation.masks import binarize
from brainmri.evaluation.postprocess import PostProcess, clean_patients


def mask_areas(
    stored: np.ndarray, rows: pd.DataFrame, threshold: float, post: PostProcess
) -> np.ndarray:
    """Pixels per slice of the thresholded uint8 probabilities after per-patient cleaning."""
    masks = clean_patients(binarize(stored, threshold), rows, post)
    return masks.reshape(len(masks), -1).sum(1)


def voter_decisions(areas: np.ndarray, min_pixels: int) -> np.ndarray:
    """0/1: tumor where the predicted mask has at least ``min_pixels`` (>= 1) pixels."""
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be at least 1, not {min_pixels}")
    return (np.asarray(areas) >= min_pixels).astype(int)


def choose_min_pixels(areas: np.ndarray, has_tumor: np.ndarray) -> tuple[int, float]:
    """The ``k`` (smallest among equals) with the best slice accuracy, and that accuracy."""
    areas = np.asarray(areas, dtype=np.int64)
    truth = np.asarray(has_tumor).astype(bool)
    if len(areas) == 0:
        raise ValueError("no validation slices to choose min_pixels on")
    # Accuracy only changes at an observed area or just above one.
    candidates = np.unique(np.concatenate([[1], areas[areas > 0], areas + 1]))
    best_k, best = 1, -1.0
    for k in candidates:
        accuracy = float(((areas >= k) == truth).mean())
        if accuracy > best:
            best_k, best = int(k), accuracy
    return best_k, best


def smooth_decisions(
    decisions: np.ndarray, patients: np.ndarray, slice_index: np.ndarray, window: int
) -> np.ndarray:
    """Majority of each slice's ``window`` neighbours (itself included) in its patient's slice
    order; ties (only where the window is cut at a volume end) keep the slice's own decision."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smooth_window must be an odd number >= 1, not {window}")
    decisions = np.asarray(decisions).astype(int)
    if window == 1:
        return decisions.copy()
    patients, slice_index = np.asarray(patients), np.asarray(slice_index)
    out = decisions.copy()
    half = window // 2
    for patient in pd.unique(patients):
        positions = np.flatnonzero(patients == patient)
        positions = positions[np.argsort(slice_index[positions], kind="stable")]
        values = decisions[positions]
        for i, position in enumerate(positions):
            near = values[max(0, i - half) : i + half + 1]
            ones = int(near.sum())
            zeros = len(near) - ones
            out[position] = 1 if ones > zeros else 0 if zeros > ones else values[i]
    return out


def voter_table(rows: pd.DataFrame, areas: np.ndarray, min_pixels: int) -> pd.DataFrame:
    """The voter's predictions in a backbone's format: id, patient, label, prob_tumor, pred."""
    pred = voter_decisions(areas, min_pixels)
    return pd.DataFrame(
        {
            "id": rows["id"].to_numpy(),
            "patient": rows["patient"].to_numpy(),
            "label": rows["has_tumor"].to_numpy(dtype=int),
            "prob_tumor": pred.astype(float),
            "pred": pred,
            "pred_area": np.asarray(areas, dtype=int),
        }
    )
