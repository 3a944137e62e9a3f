"""Tables and arrays of a run: the manifest, splits.csv joined to it, and the uint8 image and
mask arrays that preprocessing writes (pandas and NumPy only: evaluation jobs need no PyTorch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.errors import InputError


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read data/manifest.csv with empty strings (not NaN) for empty text cells."""
    return pd.read_csv(path, keep_default_na=False)


def load_table(manifest: str | Path, splits: str | Path) -> pd.DataFrame:
    """The manifest joined with splits.csv (one row per image, manifest order)."""
    table = read_manifest(manifest)
    split_table = pd.read_csv(splits, keep_default_na=False)
    merged = table.merge(split_table, on="id", how="left", validate="one_to_one")
    if merged["cls_split"].isna().any() or "" in set(merged["cls_split"]):
        missing = merged.loc[merged["cls_split"].isna() | (merged["cls_split"] == ""), "id"]
        raise InputError(f"{splits}: no split for {len(missing)} images, e.g. {missing.iloc[0]}")
    return merged


def open_array(data_dir: str | Path, source: str, name: str = "images") -> np.ndarray:
    """Memory-map ``data/<source>/<name>.npy``."""
    path = Path(data_dir) / source / f"{name}.npy"
    if not path.is_file():
        raise InputError(f"{path}: preprocessed array not found (run the preprocessing rules)")
    return np.load(path, mmap_mode="r")


def gather(data_dir: str | Path, rows: pd.DataFrame, name: str = "images") -> np.ndarray:
    """Copy the arrays of ``rows`` (any mix of sources) into one in-memory uint8 array."""
    if rows.empty:
        raise InputError("no images selected")
    parts = []
    order = []
    for source, frame in rows.groupby("source", sort=True):
        array = open_array(data_dir, str(source), name)
        parts.append(np.asarray(array[np.sort(frame["array_index"].to_numpy())]))
        order.extend(frame.sort_values("array_index").index)
    stacked = np.concatenate(parts) if len(parts) > 1 else parts[0]
    position = {index: i for i, index in enumerate(order)}
    return np.ascontiguousarray(stacked[[position[i] for i in rows.index]])
