"""Figures: confusion matrices, error galleries (paper Fig. 4), overlays (Fig. 6), curves.

Matplotlib's Agg backend, small figures at 100 dpi; the same inputs give the same PNG bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap

from brainmri.errors import InputError
from brainmri.evaluation.classification import CLASS_NAMES
from brainmri.io import atomic_path
from brainmri.tables import ArrayFiles, gather

# Text in figures (slice ids, file names) comes from the data: shown as written, never parsed
# as mathtext (an id with two `$` would otherwise be typeset or crash the figure).
matplotlib.rcParams["text.parse_math"] = False
DPI = 100
RED = ListedColormap(["red"])
# No software version or date in the PNG: identical bytes for identical figures.
PNG_METADATA = {"Software": None}
# (id, image, mask or None, p(tumor) or None: None for ground-truth examples, not predictions)
GalleryItem = tuple[str, np.ndarray, np.ndarray | None, float | None]


def save_figure(figure: plt.Figure, path: str | os.PathLike[str]) -> None:
    """Save a PNG atomically and close the figure."""
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata=PNG_METADATA)
    finally:
        plt.close(figure)


def message_figure(text: str) -> plt.Figure:
    """A small figure holding only ``text`` (for an empty selection)."""
    figure = plt.figure(figsize=(4, 1))
    figure.text(0.5, 0.5, text, ha="center", va="center")
    return figure


def confusion_figure(matrix: list[list[int]], title: str) -> plt.Figure:
    """Seaborn heatmap of a 2 x 2 confusion matrix with the counts written in the cells."""
    figure, axis = plt.subplots(figsize=(3.6, 3.2))
    sns.heatmap(
        np.asarray(matrix),
        annot=True,
        fmt="d",
        cmap="Blues",
        cbar=False,
        ax=axis,
        xticklabels=CLASS_NAMES,
        yticklabels=CLASS_NAMES,
    )
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    return figure


def read_png(path: Path) -> np.ndarray:
    """Pixels of an image file; a clear InputError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{path}: unreadable image ({error})") from None


def load_gallery_items(
    errors: pd.DataFrame, manifest: pd.DataFrame, images: ArrayFiles, masks: ArrayFiles
) -> list[GalleryItem]:
    """(id, image, mask or None, prob_tumor) of each row of ``errors``, read from the
    preprocessed arrays (``{source: images.npy}``, ``{source: masks.npy}``) given by name."""
    by_id = manifest.set_index("id", drop=False)
    unknown = [name for name in errors["id"] if name not in by_id.index]
    if unknown:
        raise InputError(f"id {unknown[0]!r} of the predictions is not in the manifest")
    if errors.empty:
        return []
    rows = by_id.loc[list(errors["id"])].reset_index(drop=True)
    pictures = gather(images, rows)
    with_mask = rows.index[rows["source"].isin(list(masks))]
    outlines = {}
    if len(with_mask):
        outlines = dict(zip(with_mask, gather(masks, rows.loc[with_mask]) > 0, strict=True))
    return [
        (str(name), pictures[i], outlines.get(i), float(prob))
        for i, (name, prob) in enumerate(zip(errors["id"], errors["prob_tumor"], strict=True))
    ]


def _wrap_id(name: str, width: int = 16) -> str:
    """A long id on two lines, broken at its last underscore (LGG: patient, then slice)."""
    if len(name) <= width or "_" not in name:
        return name
    head, tail = name.rsplit("_", 1)
    return f"{head}_\n{tail}"


def _show(axis: plt.Axes, image: np.ndarray, mask: np.ndarray | None, title: str) -> None:
    axis.imshow(image, cmap="gray" if image.ndim == 2 else None)
    if mask is not None and mask.any():
        axis.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    axis.set_title(title, fontsize=9)
    axis.axis("off")


def error_gallery(
    errors: dict[str, list[GalleryItem]], title: str, totals: dict[str, int] | None = None
) -> plt.Figure:
    """One row per group (e.g. 'false negatives', 'false positives') of (id, image, mask, prob),
    the mask as a green contour; a group without items shows 'no <group>'. ``totals`` adds
    '(k of n shown)' to a row's label."""
    columns = max(1, max((len(v) for v in errors.values()), default=1))
    figure, axes = plt.subplots(
        len(errors),
        columns,
        figsize=(1.9 * columns + 0.6, 2.2 * len(errors)),
        squeeze=False,
        layout="constrained",
    )
    for row, (label, items) in enumerate(errors.items()):
        for column in range(columns):
            axis = axes[row, column]
            if column < len(items):
                name, image, mask, prob = items[column]
                caption = (
                    _wrap_id(name) if prob is None else f"{_wrap_id(name)}\np(tumor)={prob:.2f}"
                )
                _show(axis, image, mask, caption)
            else:
                axis.axis("off")
        if not items:
            axes[row, 0].text(0.5, 0.5, f"no {label}", ha="center", va="center", fontsize=9)
        text = label
        if totals is not None and label in totals:
            text = f"{label}\n({len(items)} of {totals[label]})"
        axes[row, 0].annotate(
            text,
            (-0.1, 0.5),
            xycoords="axes fraction",
            rotation=90,
            ha="right",
            va="center",
            fontsize=9,
        )
    figure.suptitle(title, fontsize=11)
    return figure


def overlay_figure(
    images: np.ndarray,
    truths: np.ndarray,
    predictions: dict[str, np.ndarray],
    titles: list[str],
) -> plt.Figure:
    """Paper Fig. 6: one row per slice: the input (FLAIR channel, grey), the ground truth, and
    each model's mask as a colour overlay with the ground truth as a green contour."""
    columns = 2 + len(predictions)
    figure, axes = plt.subplots(
        len(images),
        columns,
        figsize=(1.8 * columns, 1.9 * len(images)),
        squeeze=False,
        layout="constrained",
    )
    for row, image in enumerate(images):
        gray = image[..., 1] if image.ndim == 3 else image  # LGG channels: pre, FLAIR, post
        truth = truths[row].astype(bool)
        axes[row, 0].imshow(gray, cmap="gray", vmin=0, vmax=255)
        heading = f"input (FLAIR)\n{titles[row]}" if row == 0 else titles[row]
        axes[row, 0].set_title(heading, fontsize=8)
        panels = [("ground truth", truth)] + [(k, v[row]) for k, v in predictions.items()]
        for column, (name, mask) in enumerate(panels, start=1):
            axis = axes[row, column]
            axis.imshow(gray, cmap="gray", vmin=0, vmax=255)
            mask = mask.astype(bool)
            axis.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap=RED, alpha=0.5)
            if column > 1 and truth.any():
                axis.contour(truth, levels=[0.5], colors="lime", linewidths=0.6)
            if row == 0:
                axis.set_title(name, fontsize=9)
        for axis in axes[row]:
            axis.axis("off")
    figure.suptitle("red: the mask (true or predicted); green contour: ground truth", fontsize=9)
    return figure


def curves_figure(histories: dict[str, pd.DataFrame], metric: str, title: str) -> plt.Figure:
    """Training / validation loss and ``metric`` per epoch, one line pair per job."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for name, history in histories.items():
        line = left.plot(history["epoch"], history["train_loss"], label=f"{name} train")[0]
        validated = history.dropna(subset=["val_loss"])  # val_every > 1: some epochs unvalidated
        left.plot(
            validated["epoch"], validated["val_loss"], "--", color=line.get_color(),
            label=f"{name} val",
        )  # fmt: skip
        if f"val_{metric}" in history:
            right.plot(
                validated["epoch"], validated[f"val_{metric}"], color=line.get_color(), label=name
            )
    left.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: val)")
    right.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric}")
    right.legend(fontsize=6)
    figure.suptitle(title)
    return figure
