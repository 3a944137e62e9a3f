"""Figures: confusion matrices, error galleries (paper Fig. 4), overlays (Fig. 6), curves."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from brainmri.io import atomic_path
from brainmri.metrics import CLASS_NAMES

DPI = 100


def save_figure(figure: plt.Figure, path: str | os.PathLike[str]) -> None:
    """Save a PNG atomically and close the figure."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)


def confusion_figure(matrix: list[list[int]], title: str) -> plt.Figure:
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


def _show(axis: plt.Axes, image: np.ndarray, mask: np.ndarray | None, title: str) -> None:
    axis.imshow(image)
    if mask is not None and mask.any():
        axis.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    axis.set_title(title, fontsize=7)
    axis.axis("off")


def error_gallery(
    errors: dict[str, list[tuple[str, np.ndarray, np.ndarray | None, float]]], title: str
) -> plt.Figure:
    """Rows 'false negatives' / 'false positives', up to 8 images each: (id, image, mask, prob)."""
    columns = max(1, max((len(v) for v in errors.values()), default=1))
    figure, axes = plt.subplots(
        len(errors), columns, figsize=(1.6 * columns + 0.4, 1.9 * len(errors)), squeeze=False
    )
    for row, (label, items) in enumerate(errors.items()):
        for column in range(columns):
            axis = axes[row, column]
            if column < len(items):
                name, image, mask, prob = items[column]
                _show(axis, image, mask, f"{name}\np(tumor)={prob:.2f}")
            else:
                axis.axis("off")
        if not items:
            axes[row, 0].text(0.5, 0.5, f"no {label}", ha="center", va="center")
        axes[row, 0].annotate(
            label,
            (-0.1, 0.5),
            xycoords="axes fraction",
            rotation=90,
            ha="right",
            va="center",
            fontsize=9,
        )
    figure.suptitle(title, fontsize=10)
    return figure


def overlay_figure(
    images: np.ndarray,
    truths: np.ndarray,
    predictions: dict[str, np.ndarray],
    titles: list[str],
) -> plt.Figure:
    """One row per slice: input (FLAIR channel as grey), ground truth, each model's mask."""
    columns = 2 + len(predictions)
    figure, axes = plt.subplots(
        len(images), columns, figsize=(1.9 * columns, 1.9 * len(images)), squeeze=False
    )
    for row, image in enumerate(images):
        gray = image[..., 1] if image.ndim == 3 else image
        axes[row, 0].imshow(gray, cmap="gray")
        axes[row, 0].set_title(titles[row], fontsize=7)
        panels = [("ground truth", truths[row])] + [(k, v[row]) for k, v in predictions.items()]
        for column, (name, mask) in enumerate(panels, start=1):
            axis = axes[row, column]
            axis.imshow(gray, cmap="gray")
            shown = np.ma.masked_where(~mask.astype(bool), mask)
            axis.imshow(shown, cmap="autumn", alpha=0.5, vmin=0, vmax=1)
            if row == 0:
                axis.set_title(name, fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    return figure


def curves_figure(histories: dict[str, pd.DataFrame], metric: str, title: str) -> plt.Figure:
    """Training / validation loss and ``metric`` per epoch, one line pair per job."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, history in histories.items():
        line = left.plot(history["epoch"], history["train_loss"], label=f"{name} train")[0]
        left.plot(
            history["epoch"], history["val_loss"], "--", color=line.get_color(), label=f"{name} val"
        )
        if f"val_{metric}" in history:
            right.plot(
                history["epoch"], history[f"val_{metric}"], color=line.get_color(), label=name
            )
    left.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: val)")
    right.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric}")
    right.legend(fontsize=6)
    figure.suptitle(title)
    return figure


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))
