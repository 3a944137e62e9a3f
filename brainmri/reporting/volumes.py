"""The report's per-test-patient tumor volumes: true vs predicted (voxels at the preprocessed
size), from the fold ensembles' and the cascade's per_slice.csv, with their correlation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def patient_volumes(ensembles: dict[str, Path], cascade_per_slice: Path) -> pd.DataFrame:
    """One row per test patient: true voxels, then predicted voxels of each fold ensemble
    (architecture -> its per_slice.csv) and of the cascade (the classifier-gated ensemble that
    volume prediction uses)."""
    columns: dict[str, pd.Series] = {}
    for arch, path in ensembles.items():
        frame = pd.read_csv(path)
        sums = frame.groupby("patient")[["true_area", "pred_area"]].sum()
        columns.setdefault("true", sums["true_area"])
        columns[f"{arch} fold ensemble"] = sums["pred_area"]
    cascade = pd.read_csv(cascade_per_slice)
    columns["cascade"] = cascade.groupby("patient")["cascade_pred_area"].sum()
    table = pd.DataFrame(columns).rename_axis("patient").reset_index()
    return table.astype({c: "Int64" for c in columns})


def correlation(a: pd.Series, b: pd.Series) -> float:
    """Pearson correlation; NaN with fewer than 2 patients or a constant column."""
    x, y = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def volume_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The table plus a last row with each prediction's correlation with the truth."""
    predicted = [c for c in table.columns if c not in ("patient", "true")]
    last = {"patient": "Pearson r with true", "true": ""} | {
        c: correlation(table["true"], table[c]) for c in predicted
    }
    body = table.astype(object).where(table.notna(), None)
    return pd.concat([body, pd.DataFrame([last])], ignore_index=True)
