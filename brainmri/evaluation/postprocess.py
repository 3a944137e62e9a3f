"""Per-patient 3D post-processing of thresholded masks (``segmentation.postprocess``).

A patient's slices are stacked in slice order (``slice_index``) into a volume; 3D connected
components (6-connected, scipy.ndimage.label) with fewer than ``min_component_voxels`` voxels
are dropped, and with ``keep_largest`` only the largest component is kept. The defaults
(0, false: the paper) leave every mask as it is.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

STRUCTURE = ndimage.generate_binary_structure(3, 1)  # 6-connectivity in 3D


@dataclass(frozen=True)
class PostProcess:
    min_component_voxels: int = 0
    keep_largest: bool = False

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> PostProcess:
        settings = settings or {}
        return cls(
            int(settings.get("min_component_voxels", 0)), bool(settings.get("keep_largest", False))
        )

    @property
    def active(self) -> bool:
        return self.min_component_voxels > 0 or self.keep_largest

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_component_voxels": self.min_component_voxels,
            "keep_largest": self.keep_largest,
        }


def clean_volume(volume: np.ndarray, post: PostProcess) -> np.ndarray:
    """Boolean (D, H, W) volume with small (and, with keep_largest, all but the largest)
    3D components removed."""
    volume = np.asarray(volume).astype(bool)
    if volume.ndim != 3:
        raise ValueError(f"expected a (slices, H, W) volume, found shape {volume.shape}")
    if not post.active or not volume.any():
        return volume
    labels, count = ndimage.label(volume, structure=STRUCTURE)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = sizes >= max(post.min_component_voxels, 1)
    if post.keep_largest and keep.any():
        largest = int(np.argmax(np.where(keep, sizes, -1)))
        keep = np.zeros_like(keep)
        keep[largest] = True
    keep[0] = False
    return keep[labels]


def clean_patients(masks: np.ndarray, rows: pd.DataFrame, post: PostProcess) -> np.ndarray:
    """Apply :func:`clean_volume` to each patient's slices of ``masks`` (aligned with ``rows``,
    which need ``patient`` and ``slice_index``); the result is in the order of ``rows``."""
    masks = np.asarray(masks).astype(bool)
    if len(masks) != len(rows):
        raise ValueError(f"{len(masks)} masks for {len(rows)} rows")
    if not post.active:
        return masks
    out = masks.copy()
    patients = rows["patient"].to_numpy()
    slices = rows["slice_index"].to_numpy()
    for patient in pd.unique(patients):
        positions = np.flatnonzero(patients == patient)
        positions = positions[np.argsort(slices[positions], kind="stable")]
        out[positions] = clean_volume(masks[positions], post)
    return out


def postprocess_arg(text: str) -> PostProcess:
    """--postprocess: a JSON object with only segmentation.postprocess's keys and types."""
    try:
        settings = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text}") from None
    if not isinstance(settings, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, not {text}")
    unknown = sorted(set(settings) - {"min_component_voxels", "keep_largest"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown key(s) {', '.join(unknown)} in {text}")
    voxels = settings.get("min_component_voxels", 0)
    if isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < 0:
        raise argparse.ArgumentTypeError(f"min_component_voxels must be an integer >= 0: {text}")
    if not isinstance(settings.get("keep_largest", False), bool):
        raise argparse.ArgumentTypeError(f"keep_largest must be true or false: {text}")
    return PostProcess.from_settings(settings)
