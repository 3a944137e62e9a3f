"""Predict on new images with the checkpoints given by name: tumor probability and decision of the
run's ensemble (:mod:`brainmri.evaluation.decision`, as evaluated: the classifiers and, when the
run has it, the segmentation voter with the run's k), and the segmentation fold ensemble's mask
where a tumor was called (the cascade's gate). The models are loaded once.

Every file under the input folder is predicted, except ``*_mask.*`` files; outputs mirror the
input's relative paths (``masks/<sub>/<name>.png``) and the CSV names files by relative path.
An image with its ``<stem>_mask.<ext>`` beside it (the Kaggle layout) also gets the Dice of the
predicted mask against it.

Images (PNG, JPG, TIFF; any size; grayscale or 3-channel) get exactly the training
preprocessing: 3-channel images stay as they are, anything else becomes grayscale copied into
3 channels; non-square images are zero-padded to a centred square; then a bilinear resize to the
preprocessing size recorded in the checkpoints, and the model's own input size and
normalisation inside the model.

The segmenters apply flip TTA when asked (``segmentation.tta``). Images are independent: the
per-volume 3-D post-processing (``segmentation.postprocess``) and the smoothing along the slice
order do not apply, and 2.5D segmenters are refused (they need each slice's neighbours) --
unless ``series``: images named ``<patient>_<n>.<ext>`` in one folder are then one patient's
slices in the order of ``n``, and all three apply as in the evaluation.
:mod:`brainmri.inference.volume` does the same on whole patients.
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
from brainmri.evaluation.decision import EnsembleRule, gate
from brainmri.evaluation.masks import binarize
from brainmri.evaluation.postprocess import PostProcess, clean_patients
from brainmri.evaluation.segmentation import overlap_metrics
from brainmri.inference.ensemble import EnsembleModels
from brainmri.inference.images import find_images, output_names, read_truth, series_rows
from brainmri.io import atomic_path, write_csv
from brainmri.models import safe_torch_load
from brainmri.untrusted import check_inside, csv_safe_frame, output_lock, safe_name, skip

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "file",
    "tumor_probability",
    "decision",
    "votes",
    "voters",
    "segmentation_voter",
    "segmentation_area_px",
    "tumor_area_px",
    "dice",
    "mask",
    "error",
    "training_data",
]
FAILURE_COLUMNS = ["file", "error"]
CHUNK = 256  # independent images predicted together (a multiple of the evaluation batches)
SYNTHETIC_NOTE = "models trained on SYNTHETIC data (demo): not a diagnosis"
TRAIN_HINT = (
    "train it first with the config whose results_dir holds it: "
    "`snakemake --cores all --configfile <config>` (for results/demo: `make demo`)"
)


@dataclass
class Prepared:
    file: str  # relative to the input folder
    image: np.ndarray  # (S, S, 3) uint8, as the models saw their training data
    shape: tuple[int, int]  # the original's height and width
    pad: tuple[int, int, int]  # square side, top, left


def load_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8: 3-channel images as they are, anything else as
    grayscale copied into 3 channels (raises InputError if unreadable)."""
    image = open_image(path)
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    return gray_to_rgb(to_uint8_gray(image))


def prepare(path: Path, size: int, name: str | None = None) -> Prepared:
    """The training preprocessing of one image (raises InputError if unreadable); ``name``:
    the file's name in the CSV (default: its file name). The decoded original is not kept."""
    rgb = load_rgb(path)
    height, width = rgb.shape[:2]
    side = max(height, width)
    padded = np.stack([square_pad(rgb[..., c]) for c in range(3)], axis=-1)
    return Prepared(
        name or path.name,
        resize_image(padded, size),
        (height, width),
        (side, (side - height) // 2, (side - width) // 2),
    )


def restore_mask(mask: np.ndarray, prepared: Prepared) -> np.ndarray:
    """A mask at the preprocessed size back to the original image's size (nearest)."""
    side, top, left = prepared.pad
    height, width = prepared.shape
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
    rule: EnsembleRule,
    threshold: float,
    output: Path,
    masks_dir: Path,
    overlays_dir: Path,
    failures_csv: Path | None = None,
    data_source: str | None = None,
    tta: bool = False,
    post: PostProcess | None = None,
    series: bool = False,
) -> list[tuple[str, str]]:
    """Write the CSV, masks and overlays of every readable image (and, if asked, a CSV of the
    files that could not be read); return those failures as (relative path, reason).

    ``rule``: the run's ensemble; the ``segmenters`` (one architecture's fold models) make the
    fold ensemble's mask at ``threshold``, kept where the ensemble says tumor. With ``series``,
    ``post`` cleans each patient's masks and the rule's smoothing applies (else neither).
    Exactly these models are used. Images are read, predicted and written in groups (a series'
    patient, else :data:`CHUNK` images), so memory does not grow with their number.
    """
    if not classifiers or not segmenters:
        raise InputError("predict needs at least one classifier and one segmenter checkpoint")
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: input folder not found")
    files = [p.relative_to(input_dir).as_posix() for p in find_images(input_dir)]
    if not files:
        raise InputError(f"{input_dir}: no files to predict")
    size = array_size([*classifiers, *segmenters])
    source = data_source or training_data_source(classifiers[0])
    if source == "synthetic":
        log.warning("These models were trained on synthetic data: %s", SYNTHETIC_NOTE)
    groups, failures = image_groups(input_dir, files, series)
    device = select_device(log)
    configure_torch(device, torch.get_num_threads())  # cuDNN / determinism flags as in training
    models = EnsembleModels(classifiers, segmenters, rule, device, tta)
    log.info("Voters: %s", ", ".join(models.voters))
    names = output_names(files)
    table = []
    how = Writing(input_dir, names, source, threshold, post)
    with (
        output_lock(masks_dir),
        atomic_path(masks_dir) as tmp_masks,
        atomic_path(overlays_dir) as tmp_overlays,
    ):
        tmp_masks.mkdir()
        tmp_overlays.mkdir()
        for group, rows in groups:
            done, bad = _predict_group(group, rows, models, size, how, (tmp_masks, tmp_overlays))
            table += done
            failures += bad
        if not table:
            raise InputError(f"{input_dir}: none of the {len(files)} file(s) is a readable image")
    label = source_label(source)
    table = [row | {"training_data": label} for row in table]
    table += [{"file": name, "error": reason, "training_data": label} for name, reason in failures]
    frame = pd.DataFrame(table, columns=CSV_COLUMNS)
    integers = ("votes", "segmentation_area_px", "tumor_area_px")
    write_csv(output, csv_safe_frame(frame.astype(dict.fromkeys(integers, "Int64"))))
    if failures_csv is not None:
        write_csv(failures_csv, csv_safe_frame(pd.DataFrame(failures, columns=FAILURE_COLUMNS)))
    return failures


@dataclass
class Writing:
    """How a group's outputs are made: the input folder, the output names, the models' data
    source, the segmentation threshold and the post-processing."""

    input_dir: Path
    names: dict[str, str]
    source: str
    threshold: float
    post: PostProcess | None


def image_groups(
    input_dir: Path, files: list[str], series: bool
) -> tuple[list[tuple[list[str], pd.DataFrame | None]], list[tuple[str, str]]]:
    """The files in the groups they are predicted in (with their series rows), and the files
    refused by name: a series' patients, else chunks of :data:`CHUNK` independent images."""
    if not series:
        chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
        return [(chunk, None) for chunk in chunks], []
    rows, bad = series_rows(files)
    failures = [(name, f"{input_dir / name}: {reason}") for name, reason in bad]
    refused = {name for name, _ in bad}
    keep = [name not in refused for name in files]
    kept = [name for name, k in zip(files, keep, strict=True) if k]
    rows = rows[keep].reset_index(drop=True)
    groups = []
    for _, patient in rows.groupby("patient", sort=False):
        groups.append(([kept[i] for i in patient.index], patient.reset_index(drop=True)))
    return groups, failures


def _predict_group(group, rows, models, size, how: Writing, folders):
    """Read, predict and write one group; its CSV rows and the files it could not read."""
    prepared, failures, kept = [], [], []
    for position, name in enumerate(group):
        path = how.input_dir / name
        try:
            for part in Path(name).parts:
                safe_name(part, f"{path}: name")
            prepared.append(prepare(check_inside(path, how.input_dir), size, name))
            kept.append(position)
        except Exception as error:  # any error is this image's alone: skip it, go on
            failures.append((name, skip(log, str(path), error)))
    if not prepared:
        return [], failures
    if rows is not None:
        rows = rows.iloc[kept].reset_index(drop=True)
    truths = {p.file: _truth(how.input_dir / p.file) for p in prepared}
    results = _predict(prepared, models, how.threshold, (how.post, rows), truths)
    table = []
    for item, mask, lines, row in results:
        _write_outputs(item, mask, lines, how, folders)
        table.append(row | {"mask": how.names[item.file]})
    return table, failures


def _write_outputs(item: Prepared, mask: np.ndarray, lines: list[str], how: Writing, folders):
    """One image's mask and overlay (its original read again: none is kept in memory)."""
    masks, overlays = folders
    target = how.names[item.file]
    (masks / target).parent.mkdir(parents=True, exist_ok=True)
    (overlays / target).parent.mkdir(parents=True, exist_ok=True)
    synthetic = how.source == "synthetic"
    if synthetic:
        lines.append(SYNTHETIC_NOTE)
    Image.fromarray(mask.astype(np.uint8) * 255).save(masks / target)
    original = load_rgb(how.input_dir / item.file)
    picture = annotate(overlay(original, mask), lines, synthetic)
    Image.fromarray(picture).save(overlays / target)


def _truth(path: Path) -> np.ndarray | None:
    """The _mask beside ``path``; an unreadable one is logged and gives no Dice."""
    try:
        return read_truth(path)
    except InputError as error:
        log.warning("No Dice for %s: %s", path, error)
        return None


def _predict(
    prepared: list[Prepared],
    models: EnsembleModels,
    threshold: float,
    how: tuple[PostProcess | None, pd.DataFrame | None],
    truths: dict[str, np.ndarray | None],
) -> list[tuple[Prepared, np.ndarray, list[str], dict]]:
    """Segment and decide; per image: the gated mask at its own size, the overlay's text lines
    and the CSV row. ``how``: the post-processing and, for a series, the images' rows
    (patient, slice_index), None for independent images; ``truths``: the ``_mask`` beside each
    image, or None."""
    post, rows = how
    images = np.stack([p.image for p in prepared])
    placed = models.place(images)
    masks = binarize(models.segment(images, rows, placed), threshold)
    order = None
    if rows is not None:
        masks = clean_patients(masks, rows, post or PostProcess())
        order = (rows["patient"].to_numpy(), rows["slice_index"].to_numpy())
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    decision = models.decide(images, areas, order, placed)
    gated = gate(masks, decision.pred)
    voters = ";".join(models.voters)
    results = []
    for i, item in enumerate(prepared):
        mask = restore_mask(gated[i], item)
        dice = None
        truth = truths.get(item.file)
        if truth is not None and truth.shape != mask.shape:
            log.warning("%s: its _mask has another size than the image; no Dice", item.file)
        elif truth is not None:
            dice = round(float(overlap_metrics(mask[None], truth[None])[0][0]), 6)
        label = "tumor" if decision.pred[i] else "no tumor"
        lines = [
            f"{label}  p(tumor)={decision.probability[i]:.2f}  "
            f"votes {int(decision.votes[i])}/{len(models.voters)}",
            f"tumor area {int(mask.sum())} px",
        ]
        voter = decision.segmentation_voter
        row = {
            "file": item.file,
            "tumor_probability": round(float(decision.probability[i]), 6),
            "decision": "tumor" if decision.pred[i] else "no_tumor",
            "votes": int(decision.votes[i]),
            "voters": voters,
            "segmentation_voter": "" if voter is None else ("tumor" if voter[i] else "no_tumor"),
            "segmentation_area_px": int(areas[i]),
            "tumor_area_px": int(mask.sum()),
            "dice": dice,
            "error": "",
        }
        results.append((item, mask, lines, row))
    return results
