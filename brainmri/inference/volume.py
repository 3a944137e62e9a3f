"""Volume prediction: a whole patient (slice folder or NIfTI) in, per-slice decisions, a 3-D mask
in the input's geometry, the tumor volume and an overview montage out.

Each slice gets exactly the training preprocessing of :mod:`brainmri.inference.predict` (zero
padding to a centred square, bilinear resize to the preprocessed size, the model's own input size
and normalisation inside the model). The run's ensemble decides per slice, exactly as in the
evaluation (:mod:`brainmri.evaluation.decision`: the classifiers, the segmentation voter with the
run's k on the cleaned masks, smoothing along the slice numbers); the segmentation fold
ensemble's mask is kept on the slices called tumor (the cascade's gate), and brought back to the
slice's size with nearest-neighbour resampling. The models are loaded once for all patients
(:class:`brainmri.inference.ensemble.EnsembleModels`). In a batch, a bad patient is reported in
its CSV row and skipped, and nothing is written for it.

The segmentation recipe is that of evaluation and the fold ensemble: each fold model's
probabilities (with flip TTA when ``segmentation.tta``) are stored as uint8 and averaged
exactly as ``segmentation_ensemble.py`` does, 2.5D models (``slice_context``) get each slice's
neighbours in the volume's slice order, and the thresholded masks are cleaned as one 3-D volume
(``segmentation.postprocess``) at the models' array size, before the classifier gate (as in the
cascade) and before the mask goes back into the input's geometry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from brainmri.data.preprocess import resize_image, square_pad
from brainmri.errors import InputError
from brainmri.evaluation.decision import gate
from brainmri.evaluation.masks import binarize, mean_probabilities
from brainmri.evaluation.postprocess import PostProcess, clean_volume
from brainmri.inference.dicom_seg import write_segmentation
from brainmri.inference.predict import Prepared, restore_mask
from brainmri.inference.uncertainty import (
    FoldSummary,
    fold_probabilities,
    patient_columns,
    shade,
    slice_disagreement,
    summarize_folds,
    write_maps,
)
from brainmri.inference.volume_io import Volume, mask_to_input
from brainmri.io import atomic_path, write_csv
from brainmri.untrusted import csv_safe_frame, output_lock, safe_name, skip

log = logging.getLogger(__name__)

SLICE_COLUMNS = [
    "slice",
    "tumor_probability",
    "decision",
    "votes",
    "segmentation_max_probability",
    "segmentation_area_px",
    "segmentation_voter",
    "tumor_voxels",
    "disagreement",
]
PATIENT_COLUMNS = [
    "patient",
    "input",
    "form",
    "shape",
    "spacing_mm",
    "missing_sequences",
    "slices",
    "tumor_slices",
    "first_tumor_slice",
    "last_tumor_slice",
    "tumor_voxels",
    "tumor_ml",
    "true_tumor_voxels",
    "voters",
    "smooth_window",
    "tta",
    "min_component_voxels",
    "keep_largest",
    "postprocess_removed_voxels",
    "fold_models",
    "mean_disagreement",
    "fold_tumor_voxels_min",
    "fold_tumor_voxels_max",
    "fold_tumor_ml_min",
    "fold_tumor_ml_max",
    "mask",
    "probability",
    "uncertainty",
    "dicom_seg",
    "overview",
    "error",
]
MONTAGE_TILES = 16
TILE = 160


@dataclass
class VolumeResult:
    per_slice: pd.DataFrame
    mask: np.ndarray  # (Z, H, W) bool, display orientation, the slices' own size
    summary: dict
    folds: FoldSummary | None = None  # probability and disagreement maps (uncertainty.py)


def model_inputs(slices: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(Z, H, W, 3) slices -> (Z, S, S, 3) as the models saw their training data; the padding."""
    height, width = slices.shape[1:3]
    side = max(height, width)
    images = np.stack(
        [
            resize_image(np.stack([square_pad(s[..., c]) for c in range(3)], axis=-1), size)
            for s in slices
        ]
    )
    return images, (side, (side - height) // 2, (side - width) // 2)


def slice_rows(volume: Volume) -> pd.DataFrame:
    """The manifest-like rows (patient, slice_index) of a volume's slices, in slice order."""
    return pd.DataFrame({"patient": volume.name, "slice_index": np.arange(len(volume.slices))})


def predict_volume(
    volume: Volume,
    models,
    size: int,
    threshold: float,
    post: PostProcess | None = None,
) -> VolumeResult:
    """Segment every slice and clean the stacked masks (``post``) at the models' size; decide
    with the run's ensemble (the voter counts the cleaned pixels, smoothing along the slice
    numbers); the gated mask back at the slices' size."""
    post = post or PostProcess()
    images, pad = model_inputs(volume.slices, size)
    rows = slice_rows(volume)
    placed = models.place(images)
    folds = fold_probabilities(models, images, rows, placed)
    stored = mean_probabilities(folds)
    seg_max = stored.reshape(len(images), -1).max(axis=1) / 255
    raw = binarize(stored, threshold)
    cleaned = clean_volume(raw, post)
    areas = cleaned.reshape(len(images), -1).sum(axis=1)
    order = (rows["patient"].to_numpy(), np.asarray(volume.slice_numbers))
    decision = models.decide(images, areas, order, placed)
    places = [
        Prepared(str(n), images[i], volume.slices.shape[1:3], pad)
        for i, n in enumerate(volume.slice_numbers)
    ]
    gated = gate(cleaned, decision.pred)
    mask = np.stack([restore_mask(m, p) for m, p in zip(gated, places, strict=True)])
    removed = 0
    if post.active:
        before = sum(
            int(restore_mask(m, p).sum())
            for m, p in zip(gate(raw, decision.pred), places, strict=True)
        )
        removed = before - int(mask.sum())
    voxels = mask.reshape(len(mask), -1).sum(axis=1)
    spread = summarize_folds(
        folds, decision.pred.astype(bool)[:, None, None], threshold, post, places
    )
    per_slice = pd.DataFrame(
        {
            "slice": volume.slice_numbers,
            "tumor_probability": np.round(decision.probability.astype(float), 6),
            "decision": np.where(decision.pred.astype(bool), "tumor", "no_tumor"),
            "votes": decision.votes,
            "segmentation_max_probability": np.round(seg_max.astype(float), 6),
            "segmentation_area_px": areas.astype(int),
            "segmentation_voter": voter_column(decision.segmentation_voter, len(images)),
            "tumor_voxels": voxels.astype(int),
            "disagreement": np.round(slice_disagreement(spread, mask), 6),
        },
        columns=SLICE_COLUMNS,
    )
    tumor = [n for n, v in zip(volume.slice_numbers, voxels, strict=True) if v]
    total = int(voxels.sum())
    summary = {
        "patient": volume.name,
        "input": volume.source,
        "form": volume.form,
        "shape": "x".join(map(str, _input_shape(volume))),
        "spacing_mm": "x".join(f"{s:g}" for s in volume.spacing_mm) if volume.spacing_mm else "",
        "missing_sequences": ";".join(volume.missing),
        "slices": len(volume.slice_numbers),
        "tumor_slices": len(tumor),
        "first_tumor_slice": min(tumor) if tumor else None,
        "last_tumor_slice": max(tumor) if tumor else None,
        "tumor_voxels": total,
        "tumor_ml": round(total * volume.voxel_ml, 4) if volume.voxel_ml else None,
        "true_tumor_voxels": volume.true_voxels,
        "voters": ";".join(models.voters),
        "smooth_window": models.rule.smooth_window if decision.smoothed else 1,
        "tta": bool(models.tta),
        "min_component_voxels": post.min_component_voxels,
        "keep_largest": post.keep_largest,
        "postprocess_removed_voxels": removed,
        "error": "",
    } | patient_columns(spread, mask, volume.voxel_ml)
    return VolumeResult(per_slice, mask, summary, spread)


def voter_column(voter: np.ndarray | None, n: int) -> np.ndarray:
    """The segmentation voter's tumor / no_tumor per slice; empty without the voter."""
    if voter is None:
        return np.full(n, "", dtype=object)
    return np.where(voter.astype(bool), "tumor", "no_tumor")


def _input_shape(volume: Volume) -> tuple[int, ...]:
    if volume.reference is not None:
        return tuple(int(d) for d in volume.reference.shape[:3])
    return tuple(int(d) for d in volume.slices.shape[:3])


def write_patient(volume: Volume, result: VolumeResult, folder: Path) -> dict[str, str]:
    """slices.csv, the mask (mask.nii.gz, or masks/<patient>_<n>_mask.png) and overview.png."""
    folder.mkdir(parents=True)
    write_csv(folder / "slices.csv", result.per_slice.astype({"votes": "Int64"}))  # no input text
    if volume.reference is not None:
        reference = volume.reference
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_intent("none")
        data = mask_to_input(volume, result.mask).astype(np.uint8)
        image = type(reference)(data, reference.affine, header)
        image.header.set_slope_inter(1, 0)
        nib.save(image, folder / "mask.nii.gz")
        mask_name = "mask.nii.gz"
    else:
        (folder / "masks").mkdir()
        for path, mask in zip(volume.slice_files, result.mask, strict=True):
            stem = path.name.rsplit(".", 1)[0]
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{stem}_mask.png")
        mask_name = "masks"
    names = {"mask": mask_name}
    if result.folds is not None:
        names |= write_maps(volume, result.folds, folder)
    if volume.dicom:
        seg_mask = mask_to_input(volume, result.mask)
        write_segmentation(volume.dicom["FLAIR"], seg_mask, folder / "seg.dcm")
        names["dicom_seg"] = "seg.dcm"
    overview(volume, result).save(folder / "overview.png")
    return names | {"overview": "overview.png"}


def _outline(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


def overview(volume: Volume, result: VolumeResult) -> Image.Image:
    """A montage of the tumor slices (at most 16, evenly spaced) with the mask outlined in green,
    each labelled with its slice number and the ensemble's tumor probability; 8 evenly spaced
    slices when no tumor was found."""
    tumor = np.flatnonzero(result.mask.reshape(len(result.mask), -1).any(axis=1))
    chosen = tumor if len(tumor) else np.arange(len(result.mask))
    count = min(MONTAGE_TILES if len(tumor) else 8, len(chosen))
    chosen = chosen[np.linspace(0, len(chosen) - 1, count).round().astype(int)]
    height, width = volume.slices.shape[1:3]
    scale = TILE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    columns = min(4, count)
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * size[0], rows * (size[1] + 14)), "black")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(chosen):
        tile = np.asarray(Image.fromarray(volume.slices[i]).resize(size, Image.BILINEAR)).copy()
        if result.folds is not None:
            spread = Image.fromarray(result.folds.disagreement[i]).resize(size, Image.BILINEAR)
            tile = shade(tile, np.asarray(spread))
        small = np.asarray(
            Image.fromarray(result.mask[i].astype(np.uint8) * 255).resize(size, Image.NEAREST)
        )
        tile[_outline(small > 127)] = (0, 255, 0)
        x, y = (k % columns) * size[0], (k // columns) * (size[1] + 14)
        sheet.paste(Image.fromarray(tile), (x, y + 14))
        probability = result.per_slice["tumor_probability"].iloc[i]
        label = f"slice {volume.slice_numbers[i]}  p={probability:.2f}"
        if result.folds is not None and result.folds.fold_models > 1:
            label += f"  u={result.per_slice['disagreement'].iloc[i]:.2f}"
        draw.text((x + 2, y + 1), label, fill="white")
    return sheet


Reader = tuple[str, Callable[[], Volume]]


def predict_volumes(
    readers: list[Reader],
    models,
    size: int,
    threshold: float,
    patients_dir: Path,
    csv_path: Path,
    post: PostProcess | None = None,
) -> list[tuple[str, str]]:
    """Predict every patient; one CSV row each; return (input, '<input>: <error>') of the failed
    ones (they also have a row, with the error, and nothing in ``patients_dir``).

    Any error while reading, predicting or writing one patient skips that patient (one line in
    the log, its traceback in the log's details file) and the others go on. A patient's name
    must be a plain folder name (:func:`brainmri.untrusted.safe_name`); a second writer of the
    same ``patients_dir`` is refused while this one runs."""
    rows, failures, done = [], [], set()
    with output_lock(patients_dir), atomic_path(patients_dir) as tmp:
        tmp.mkdir()
        for label, read in readers:
            try:
                volume = read()
                safe_name(volume.name, f"{label}: patient name")
                if volume.name in done:
                    raise InputError(f"{label}: a second patient named {volume.name}")
                result = predict_volume(volume, models, size, threshold, post)
                with atomic_path(tmp / volume.name) as folder:
                    names = write_patient(volume, result, folder)
            except Exception as error:  # any error is this patient's alone: skip it, go on
                message = skip(log, label, error)
                failures.append((label, message))
                rows.append({"input": label, "error": message})
                continue
            done.add(volume.name)
            log.info(
                "%s: %d of %d slices with tumor, %d voxels",
                volume.name,
                result.summary["tumor_slices"],
                result.summary["slices"],
                result.summary["tumor_voxels"],
            )
            rows.append(result.summary | {k: f"{volume.name}/{v}" for k, v in names.items()})
    frame = pd.DataFrame(rows, columns=PATIENT_COLUMNS)
    integers = [
        "slices",
        "tumor_slices",
        "first_tumor_slice",
        "last_tumor_slice",
        "tumor_voxels",
        "true_tumor_voxels",
        "min_component_voxels",
        "postprocess_removed_voxels",
        "fold_models",
        "fold_tumor_voxels_min",
        "fold_tumor_voxels_max",
        "smooth_window",
    ]
    write_csv(csv_path, csv_safe_frame(frame.astype(dict.fromkeys(integers, "Int64"))))
    return failures
