"""Predict on new images with the checkpoints given by name: tumor probability and decision of the
classifier ensemble, and a mask from the segmentation fold ensemble where a tumor was called.

Images (PNG, JPG, TIFF; any size; grayscale or 3-channel) get exactly the training
preprocessing: 3-channel images stay as they are, anything else becomes grayscale copied into
3 channels; non-square images are zero-padded to a centred square; then a bilinear resize to the
preprocessing size recorded in the checkpoints, and the model's own input size and
normalisation inside the model.

The segmenters apply flip TTA when asked (``segmentation.tta``). The per-volume 3-D
post-processing (``segmentation.postprocess``) does not apply: the images are independent, not
a patient's stacked slices, and 2.5D segmenters are refused (they need each slice's neighbours);
:mod:`brainmri.inference.volume` does both on whole patients.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from brainmri.accelerator import configure_torch
from brainmri.data.preprocess import (
    gray_to_rgb,
    open_image,
    resize_image,
    square_pad,
    to_uint8_gray,
)
from brainmri.devices import select_device
from brainmri.errors import InputError
from brainmri.evaluation.classification import decide, vote
from brainmri.evaluation.masks import binarize
from brainmri.inference.segment import (
    inference_batches,
    load_for_inference,
    place,
    stored_probabilities,
)
from brainmri.io import atomic_path, write_csv
from brainmri.models import safe_torch_load
from brainmri.training.evaluate import predict_logits

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "file",
    "tumor_probability",
    "decision",
    "votes",
    "tumor_area_px",
    "error",
    "training_data",
]
FAILURE_COLUMNS = ["file", "error"]
SYNTHETIC_NOTE = "models trained on SYNTHETIC data (demo): not a diagnosis"
TRAIN_HINT = (
    "train it first with the config whose results_dir holds it: "
    "`snakemake --cores all --configfile <config>` (for results/demo: `make demo`)"
)


@dataclass
class Prepared:
    file: str
    image: np.ndarray  # (S, S, 3) uint8, as the models saw their training data
    original: np.ndarray  # (H, W, 3) uint8, for the overlay
    pad: tuple[int, int, int]  # square side, top, left


def prepare(path: Path, size: int) -> Prepared:
    """The training preprocessing of one image (raises InputError if unreadable)."""
    image = open_image(path)
    if image.mode == "RGB":
        rgb = np.asarray(image, dtype=np.uint8)
    else:
        rgb = gray_to_rgb(to_uint8_gray(image))
    height, width = rgb.shape[:2]
    side = max(height, width)
    padded = np.stack([square_pad(rgb[..., c]) for c in range(3)], axis=-1)
    return Prepared(
        path.name,
        resize_image(padded, size),
        rgb,
        (side, (side - height) // 2, (side - width) // 2),
    )


def restore_mask(mask: np.ndarray, prepared: Prepared) -> np.ndarray:
    """A mask at the preprocessed size back to the original image's size (nearest)."""
    side, top, left = prepared.pad
    height, width = prepared.original.shape[:2]
    full = Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)
    return np.asarray(full)[top : top + height, left : left + width] > 127


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.55 * out[mask] + 0.45 * np.array([255, 40, 40], dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def training_data_source(checkpoint: Path) -> str:
    """Where the models' training data came from (data.source), as far as the results directory
    of ``checkpoint`` (<results>/<stage>/<name>/model.pt) records it in the report's
    metrics.json; 'unknown' otherwise."""
    metrics = checkpoint.parents[2] / "report" / "metrics.json"
    try:
        return str(json.loads(metrics.read_text())["data_source"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "unknown"


def source_label(source: str) -> str:
    """The CSV's training_data value: the data source, with the note when it is synthetic."""
    return f"synthetic ({SYNTHETIC_NOTE})" if source == "synthetic" else source


def annotate(image: np.ndarray, lines: list[str], warning: bool) -> np.ndarray:
    """The overlay with a text banner above it (decision, probability, votes; the note on
    synthetic training data in red), wide enough for the text at a readable size."""
    height, width = image.shape[:2]
    size = max(12, width // 32)
    font = ImageFont.load_default(size=size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(line, font=font)) for line in lines) + 2 * 6
    line_height = size + 6
    canvas = Image.new("RGB", (max(width, text_width), height + line_height * len(lines) + 6))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        colour = (255, 90, 90) if warning and k == len(lines) - 1 else (255, 255, 255)
        draw.text((6, 3 + k * line_height), line, fill=colour, font=font)
    canvas.paste(Image.fromarray(image), (0, line_height * len(lines) + 6))
    return np.asarray(canvas)


def array_size(checkpoints: list[Path]) -> int:
    """The preprocessing size (side of the stored arrays) the models were trained on, from
    their checkpoints; they must agree."""
    sizes = {}
    for path in checkpoints:
        if not path.is_file():
            raise InputError(f"{path}: trained model not found; {TRAIN_HINT}")
        preprocessing = safe_torch_load(path).get("preprocessing")
        if not isinstance(preprocessing, dict) or "array_size" not in preprocessing:
            raise InputError(
                f"{path}: the checkpoint does not record its preprocessing (made by an older "
                "version of the workflow): train it again"
            )
        sizes[path] = int(preprocessing["array_size"])
    if len(set(sizes.values())) != 1:
        raise InputError(
            "the models were trained on different preprocessing sizes: "
            + ", ".join(f"{path} {size} px" for path, size in sizes.items())
        )
    return next(iter(sizes.values()))


def predict_folder(
    input_dir: Path,
    classifiers: list[Path],
    segmenters: list[Path],
    method: str,
    cutoff: float,
    threshold: float,
    output: Path,
    masks_dir: Path,
    overlays_dir: Path,
    failures_csv: Path | None = None,
    data_source: str | None = None,
    tta: bool = False,
) -> list[tuple[str, str]]:
    """Write the CSV, masks and overlays of every readable image (and, if asked, a CSV of the
    files that could not be read); return those failures as (file name, reason).

    ``classifiers`` vote (``method``; a model says tumor at probability >= ``cutoff``); the
    ``segmenters`` (one architecture's fold models) are averaged and their mask thresholded at
    ``threshold`` where the vote says tumor. Exactly these models are used.
    """
    if not classifiers or not segmenters:
        raise InputError("predict needs at least one classifier and one segmenter checkpoint")
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: input folder not found")
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{input_dir}: no files to predict")
    size = array_size([*classifiers, *segmenters])
    source = data_source or training_data_source(classifiers[0])
    if source == "synthetic":
        log.warning("These models were trained on synthetic data: %s", SYNTHETIC_NOTE)
    prepared, failures = [], []
    for path in files:
        try:
            prepared.append(prepare(path, size))
        except InputError as error:
            log.error("Skipping %s", error)
            failures.append((path.name, str(error)))
    if not prepared:
        raise InputError(f"{input_dir}: none of the {len(files)} file(s) is a readable image")
    device = select_device(log)
    configure_torch(device, torch.get_num_threads())  # cuDNN / determinism flags as in training
    with atomic_path(masks_dir) as tmp_masks, atomic_path(overlays_dir) as tmp_overlays:
        tmp_masks.mkdir()
        tmp_overlays.mkdir()
        rows = _predict(
            prepared,
            classifiers,
            segmenters,
            device,
            (method, cutoff, threshold, source),
            tmp_masks,
            tmp_overlays,
            tta,
        )
    label = source_label(source)
    empty = {"tumor_probability": None, "decision": "", "votes": None, "tumor_area_px": None}
    rows += [
        {"file": name, **empty, "error": reason, "training_data": label}
        for name, reason in failures
    ]
    frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
    write_csv(output, frame.astype({"votes": "Int64", "tumor_area_px": "Int64"}))
    if failures_csv is not None:
        write_csv(failures_csv, pd.DataFrame(failures, columns=FAILURE_COLUMNS))
    return failures


def _predict(
    prepared: list[Prepared],
    classifiers: list[Path],
    segmenters: list[Path],
    device: torch.device,
    how: tuple[str, float, float, str],
    masks_dir: Path,
    overlays_dir: Path,
    tta: bool = False,
) -> list[dict]:
    """Classify and segment the prepared images; write masks and overlays; return CSV rows.
    ``how``: the ensemble method, the classifier cut-off, the mask threshold and the training
    data source."""
    method, cutoff, threshold, source = how
    images = np.stack([p.image for p in prepared])
    placed = place(images, device)
    preds, probs = [], []
    for path in classifiers:
        model, checkpoint = load_for_inference(path, device)
        batches = inference_batches(placed, checkpoint, device)
        prob = torch.softmax(predict_logits(model, batches.epoch(), device), 1)[:, 1].numpy()
        probs.append(prob)
        preds.append(decide(prob, cutoff))
    decision, mean_prob, votes = vote(np.stack(preds), np.stack(probs), method, cutoff)
    seg_stored, _ = stored_probabilities(segmenters, images, device, tta)
    seg_masks = binarize(seg_stored.cpu().numpy(), threshold)
    rows = []
    for i, item in enumerate(prepared):
        mask = restore_mask(seg_masks[i] & bool(decision[i]), item)
        stem = Path(item.file).stem
        label = "tumor" if decision[i] else "no tumor"
        lines = [
            f"{label}  p(tumor)={mean_prob[i]:.2f}  votes {int(votes[i])}/{len(classifiers)}",
            f"tumor area {int(mask.sum())} px",
        ]
        if source == "synthetic":
            lines.append(SYNTHETIC_NOTE)
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks_dir / f"{stem}.png")
        picture = annotate(overlay(item.original, mask), lines, source == "synthetic")
        Image.fromarray(picture).save(overlays_dir / f"{stem}.png")
        rows.append(
            {
                "file": item.file,
                "tumor_probability": round(float(mean_prob[i]), 6),
                "decision": "tumor" if decision[i] else "no_tumor",
                "votes": int(votes[i]),
                "tumor_area_px": int(mask.sum()),
                "error": "",
                "training_data": source_label(source),
            }
        )
    return rows
