"""Tables and arrays of a run: the manifest, splits.csv joined to it, and the uint8 image and
mask arrays that preprocessing writes (pandas and NumPy only: evaluation jobs need no PyTorch)."""

from __future__ import annotations

from collections.abc import Mapping
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


ArrayFiles = Mapping[str, Path]
"""The uint8 arrays of each source, by name: ``{"lgg": .../lgg/images.npy, "btm": ...}``."""


def array_files(pairs: list[str], option: str = "--images") -> dict[str, Path]:
    """``source=path`` pairs of a command line (``--images lgg=a.npy btm=b.npy``) as a dict."""
    files: dict[str, Path] = {}
    for pair in pairs:
        source, sep, path = pair.partition("=")
        if not sep or not source or not path or source in files:
            raise InputError(f"{option} {pair}: expected distinct SOURCE=PATH pairs")
        files[source] = Path(path)
    return files


def open_array(files: ArrayFiles | str | Path, source: str, name: str = "images") -> np.ndarray:
    """Memory-map the array of ``source``: ``files[source]``, or ``<folder>/<source>/<name>.npy``
    when ``files`` is a data folder (the benchmark's layout)."""
    if isinstance(files, Mapping):
        if source not in files:
            raise InputError(f"no {name} array given for source {source!r} ({sorted(files)})")
        path = Path(files[source])
    else:
        path = Path(files) / source / f"{name}.npy"
    if not path.is_file():
        raise InputError(f"{path}: preprocessed array not found (run the preprocessing rules)")
    return np.load(path, mmap_mode="r")


def gather(files: ArrayFiles | str | Path, rows: pd.DataFrame, name: str = "images") -> np.ndarray:
    """Copy the arrays of ``rows`` (any mix of sources) into one in-memory uint8 array."""
    if rows.empty:
        raise InputError("no images selected")
    parts = []
    order = []
    for source, frame in rows.groupby("source", sort=True):
        array = open_array(files, str(source), name)
        parts.append(np.asarray(array[np.sort(frame["array_index"].to_numpy())]))
        order.extend(frame.sort_values("array_index").index)
    stacked = np.concatenate(parts) if len(parts) > 1 else parts[0]
    position = {index: i for i, index in enumerate(order)}
    return np.ascontiguousarray(stacked[[position[i] for i in rows.index]])


def segmentation_rows(manifest: str | Path, splits: str | Path, fold: int | None = None):
    """The LGG slices of the segmentation test set (``fold`` None) or of one validation fold
    (``seg_split`` train, that ``fold``), in manifest order, index 0..n-1; InputError if none.

    The row order of every ``test_probabilities.npy`` and ``per_slice.csv``."""
    table = load_table(manifest, splits)
    if fold is None:
        rows, what = table[table["seg_split"] == "test"], "seg_split test"
    else:
        rows = table[(table["seg_split"] == "train") & (table["fold"] == fold)]
        what = f"seg_split train and fold {fold}"
    if rows.empty:
        raise InputError(f"{splits}: no LGG slices with {what}")
    return rows.reset_index(drop=True)
