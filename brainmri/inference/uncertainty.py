"""The fold ensemble's probability and disagreement beside each volume mask.

* probability: the segmentation fold ensemble's mean tumor probability per voxel (the stored
  uint8 x 255 form the mask is thresholded from; before post-processing and the classifier gate).
* disagreement: the per-voxel standard deviation of the fold models' probabilities (population
  std over the F fold models, each probability in [0, 1]: 0 where the models agree, at most 0.5
  where half say 0 and half say 1), stored as uint8 x 255 (so at most 128).
* per patient: the mean disagreement inside the predicted tumor, and the range of the tumor
  volume over the fold models, each model's mask made by the same recipe as the ensemble's
  (threshold, 3-D post-processing, classifier gate).

Both maps are brought back to the slices' size with bilinear resampling (the mask: nearest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from brainmri.evaluation.masks import binarize, mean_probabilities, quantize
from brainmri.evaluation.postprocess import PostProcess, clean_volume
from brainmri.inference.predict import Prepared, restore_mask
from brainmri.inference.volume_io import Volume, mask_to_input

HEAT = np.array([255, 200, 0], dtype=np.float32)  # the overview's colour of disagreement


@dataclass
class FoldSummary:
    probability: np.ndarray  # (Z, H, W) uint8, mean probability x 255, the slices' size
    disagreement: np.ndarray  # (Z, H, W) uint8, std x 255, the slices' size
    fold_voxels: list[int]  # tumor voxels of each fold model's own mask
    fold_models: int


def fold_probabilities(models, images: np.ndarray, rows, placed=None) -> list[np.ndarray]:
    """Each fold model's stored (uint8) probabilities (``placed``: the images already on the
    device); a models object with only ``segment`` (one ensemble output) counts as one fold."""
    if hasattr(models, "segment_folds"):
        return models.segment_folds(images, rows, placed)
    return [models.segment(images, rows, placed)]


def disagreement(folds: list[np.ndarray]) -> np.ndarray:
    """Per-voxel standard deviation of the folds' probabilities, stored as uint8 x 255."""
    if len(folds) < 2:
        return np.zeros(folds[0].shape, dtype=np.uint8)
    mean = np.zeros(folds[0].shape, dtype=np.float32)
    square = np.zeros(folds[0].shape, dtype=np.float32)
    for fold in folds:
        values = fold.astype(np.float32) / 255
        mean += values
        square += values * values
    mean /= len(folds)
    variance = np.maximum(square / len(folds) - mean * mean, 0)
    return quantize(np.sqrt(variance))


def restore_map(values: np.ndarray, prepared: Prepared) -> np.ndarray:
    """A uint8 map at the preprocessed size back to the slice's size (bilinear)."""
    side, top, left = prepared.pad
    height, width = prepared.shape
    full = Image.fromarray(values).resize((side, side), Image.BILINEAR)
    return np.asarray(full)[top : top + height, left : left + width]


def summarize_folds(
    folds: list[np.ndarray],
    gate: np.ndarray,
    threshold: float,
    post: PostProcess,
    places: list[Prepared],
) -> FoldSummary:
    """The maps at the slices' size, and each fold model's tumor voxels (``gate``: (Z, 1, 1)
    the classifier's per-slice decision)."""
    mean = mean_probabilities(folds)
    spread = disagreement(folds)
    voxels = []
    for fold in folds if len(folds) > 1 else []:
        own = clean_volume(binarize(fold, threshold), post) & gate
        voxels.append(sum(int(restore_mask(m, p).sum()) for m, p in zip(own, places, strict=True)))
    return FoldSummary(
        probability=np.stack([restore_map(m, p) for m, p in zip(mean, places, strict=True)]),
        disagreement=np.stack([restore_map(s, p) for s, p in zip(spread, places, strict=True)]),
        fold_voxels=voxels,
        fold_models=len(folds),
    )


def slice_disagreement(summary: FoldSummary, mask: np.ndarray) -> np.ndarray:
    """Per slice: the mean disagreement (std, 0..0.5) inside the predicted tumor; 0 without."""
    means = np.zeros(len(mask))
    for z in range(len(mask)):  # one slice at a time: no float copy of the whole volume
        inside = mask[z].reshape(-1)
        count = inside.sum()
        if count:
            spread = summary.disagreement[z].reshape(-1).astype(np.float64) / 255
            means[z] = (spread * inside).sum() / count
    return means


def patient_columns(summary: FoldSummary, mask: np.ndarray, voxel_ml: float | None) -> dict:
    """volumes.csv's uncertainty columns."""
    inside = mask.astype(bool)
    mean = float(summary.disagreement[inside].mean() / 255) if inside.any() else None
    low = min(summary.fold_voxels) if summary.fold_voxels else None
    high = max(summary.fold_voxels) if summary.fold_voxels else None

    def ml(count):
        return round(count * voxel_ml, 4) if count is not None and voxel_ml else None

    return {
        "fold_models": summary.fold_models,
        "mean_disagreement": round(mean, 6) if mean is not None else None,
        "fold_tumor_voxels_min": low,
        "fold_tumor_voxels_max": high,
        "fold_tumor_ml_min": ml(low),
        "fold_tumor_ml_max": ml(high),
    }


def write_maps(volume: Volume, summary: FoldSummary, folder: Path) -> dict[str, str]:
    """prob.nii.gz and uncertainty.nii.gz in the NIfTI (or DICOM) input's geometry, or, for a
    slice folder, probability/<slice>_prob.png and uncertainty/<slice>_uncertainty.png."""
    maps = {"probability": summary.probability, "uncertainty": summary.disagreement}
    names = {}
    if volume.reference is not None:
        for key, values in maps.items():
            name = "prob.nii.gz" if key == "probability" else "uncertainty.nii.gz"
            header = volume.reference.header.copy()
            header.set_data_dtype(np.uint8)
            header.set_intent("none")
            data = mask_to_input(volume, values).astype(np.uint8)
            image = type(volume.reference)(data, volume.reference.affine, header)
            image.header.set_slope_inter(1, 0)
            nib.save(image, folder / name)
            names[key] = name
        return names
    for key, values in maps.items():
        suffix = "prob" if key == "probability" else "uncertainty"
        (folder / key).mkdir()
        for path, plane in zip(volume.slice_files, values, strict=True):
            stem = path.name.rsplit(".", 1)[0]
            Image.fromarray(plane).save(folder / key / f"{stem}_{suffix}.png")
        names[key] = key
    return names


def shade(tile: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """The overview tile with the disagreement (uint8 std x 255, the tile's size) blended in
    amber: fully opaque at std 0.5, invisible where the fold models agree."""
    alpha = np.clip(spread.astype(np.float32) / 128, 0, 1)[..., None] * 0.85
    return (tile.astype(np.float32) * (1 - alpha) + HEAT * alpha).round().astype(np.uint8)
