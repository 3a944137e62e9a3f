"""Test Dice reported separately for patients with all sequences and with a missing one
(the manifest's ``missing_modalities``: a pre- or post-contrast sequence replaced by FLAIR)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def by_sequences(rows: pd.DataFrame, frame: pd.DataFrame, volume: pd.Series) -> dict[str, Any]:
    """Tumor-slice Dice and volume Dice of the patients with all sequences and of the others.

    ``rows`` (manifest rows with ``patient`` and ``missing_modalities``) and ``frame``
    (per-slice metrics) are aligned; ``volume`` is the volume Dice by patient.
    """
    if "missing_modalities" not in rows:
        return {}
    missing = rows["missing_modalities"].fillna("").astype(str).to_numpy() != ""
    patients = rows["patient"].to_numpy()
    dice = frame["dice"].to_numpy(dtype=np.float64)
    tumor = frame["has_tumor"].to_numpy(dtype=int) == 1
    report: dict[str, Any] = {}
    for name, selected in (("all_sequences", ~missing), ("missing_sequence", missing)):
        group = sorted(set(patients[selected].tolist()))
        slices = selected & tumor
        report[name] = {
            "patients": len(group),
            "tumor_slices": int(slices.sum()),
            "dice_tumor_slices": float(dice[slices].mean()) if slices.any() else None,
            "volume_dice": float(volume.loc[group].mean()) if group else None,
        }
    return report
