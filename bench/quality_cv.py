"""The quality benchmark's data, patient-level cross-validation plan, budgeted training and
inference (bench/quality.py drives them; scoring is in bench/quality_score.py).

Everything a fold trains or predicts goes through the package: preprocessing
(:func:`brainmri.data.preprocess.preprocess_lgg`), the patient picker of the splits, the
training setup the jobs use (:func:`brainmri.training.setup.build_training_setup` +
:func:`brainmri.training.loop.fit`), checkpoints, and the inference path of evaluation
(:func:`brainmri.inference.segment.stored_probabilities`, TTA included).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold

from brainmri.data.archives import ExtractionLimits, extract_archive
from brainmri.data.preprocess import preprocess_lgg
from brainmri.data.splits import patient_table, pick_patients
from brainmri.errors import InputError
from brainmri.io import write_text
from brainmri.models import Normalized, safe_torch_load, save_checkpoint
from brainmri.tables import gather, read_manifest
from brainmri.training.evaluate import predict_logits
from brainmri.training.loop import FitSettings, configure_torch, fit
from brainmri.training.losses import selection_column
from brainmri.training.modality import FLAIR
from brainmri.training.resume import seed_everything
from brainmri.training.setup import build_training_setup

log = logging.getLogger(__name__)
ARCHIVE = "lgg-mri-segmentation"
CPU = torch.device("cpu")


# --- data ------------------------------------------------------------------------------------


def raw_folder(source: Path, archive: str, extracted: Path) -> Path:
    """The raw files of ``<archive>.zip`` in ``source`` (safely extracted once to
    ``extracted``) or of its extracted folder ``source/<archive>``."""
    zipped, folder = source / f"{archive}.zip", source / archive
    if zipped.is_file():
        if not extracted.is_dir():
            extract_archive(zipped, extracted, ExtractionLimits())
        return extracted
    if folder.is_dir():
        return folder
    raise InputError(f"{source}: neither {zipped.name} nor {folder.name}/ found in it")


def prepare_data(source: Path, work: Path, size: int) -> Path:
    """``<work>/data<size>`` with ``lgg/{images,masks}.npy`` and ``manifest.csv`` from a folder
    in the Kaggle archive layout (``lgg-mri-segmentation.zip`` or its extracted folder, as
    ``data.local_dir``); built once, reused after."""
    data = work / f"data{size}"
    if (data / "manifest.csv").is_file():
        return data
    raw = raw_folder(source, ARCHIVE, work / "raw_lgg")
    lgg = data / "lgg"
    preprocess_lgg(
        raw, size, lgg / "png", lgg / "images.npy", lgg / "masks.npy", lgg / "part.csv", 2
    )
    shutil.copyfile(lgg / "part.csv", data / "manifest.csv")
    return data


def load_rows(data: Path) -> pd.DataFrame:
    """The LGG manifest rows (index 0..n-1, manifest order)."""
    rows = read_manifest(data / "manifest.csv")
    return rows[rows["source"] == "lgg"].reset_index(drop=True)


def flair_only(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) images with pre- and post-contrast replaced by FLAIR (a copy), as the
    data holds a patient without those sequences."""
    out = np.array(images, copy=True)
    out[..., 0] = images[..., FLAIR]
    out[..., 2] = images[..., FLAIR]
    return out


def loader(data: Path) -> Callable[[pd.DataFrame, str], np.ndarray]:
    """A setup Loader of ``data``; rows with ``flair_copy`` true get their FLAIR-only images."""

    def load(rows: pd.DataFrame, kind: str) -> np.ndarray:
        arrays = gather(data, rows, kind)
        if kind == "images" and "flair_copy" in rows and rows["flair_copy"].any():
            copies = rows["flair_copy"].to_numpy(dtype=bool)
            arrays[copies] = flair_only(arrays[copies])
        return arrays

    return load


def with_flair_copies(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` and a FLAIR-only copy of each (``flair_copy`` true; index 0..2n-1)."""
    copies = rows.assign(flair_copy=True, id=rows["id"] + "#flair")
    return pd.concat([rows.assign(flair_copy=False), copies], ignore_index=True)


# --- cross-validation plan -------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """One outer fold: the model trains on ``train``, its checkpoint (and the detector's k)
    is chosen on ``val``, and it scores ``test``; the three are disjoint sets of patients."""

    number: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def cv_plan(rows: pd.DataFrame, folds: int, val_fraction: float, seed: int) -> list[Fold]:
    """Patient-level K-fold over every patient (stratified by tumor slices, grouped by patient);
    inside each fold's training patients, ``val_fraction`` of them (stratified by institution)
    are the inner validation patients."""
    if folds < 2 or folds > rows["patient"].nunique():
        raise InputError(f"--folds {folds}: needs 2 to {rows['patient'].nunique()} folds")
    rng = np.random.default_rng(seed)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    plan = []
    for number, (outer, inner) in enumerate(
        splitter.split(rows, rows["has_tumor"], groups=rows["patient"])
    ):
        test = sorted(set(rows["patient"].iloc[inner]))
        training = rows.iloc[outer]
        val = pick_patients(patient_table(training), val_fraction, rng, "--inner-val")
        train = sorted(set(training["patient"]) - set(val))
        plan.append(Fold(number, tuple(train), tuple(val), tuple(test)))
    return plan


def plan_table(plan: list[Fold]) -> pd.DataFrame:
    """patient, fold, role (train / val / test) of every patient in every fold."""
    return pd.DataFrame(
        [
            {"patient": p, "fold": f.number, "role": role}
            for f in plan
            for role in ("train", "val", "test")
            for p in getattr(f, role)
        ]
    )


def of(rows: pd.DataFrame, patients: tuple[str, ...]) -> pd.DataFrame:
    return rows[rows["patient"].isin(patients)]


# --- training under a CPU-seconds budget -----------------------------------------------------


class BudgetSpent(Exception):
    """Raised at the start of an epoch when the training budget is spent."""


def clock_of(name: str) -> Callable[[], float]:
    """CPU seconds of this process (fair on a shared machine) or wall-clock seconds."""
    return time.process_time if name == "cpu" else time.perf_counter


def budgeted(batches: Callable, clock: Callable[[], float], budget: float) -> Callable:
    """``batches(epoch)`` that raises :class:`BudgetSpent` instead of starting an epoch when
    less than half of the last epoch's cost is left of ``budget`` (so the budget is used to
    within half an epoch either way, never a partial epoch)."""
    start = clock()
    marks: list[float] = []

    def train_batches(epoch: int):
        now = clock() - start
        last = now - marks[-1] if marks else 0.0
        if marks and budget - now < last / 2:
            raise BudgetSpent(epoch)
        marks.append(now)
        return batches(epoch)

    return train_batches


def budgeted_fit(
    task: str,
    settings: dict[str, Any],
    data: Path,
    train: pd.DataFrame,
    val: pd.DataFrame,
    budget: float,
    clock: str,
    seed: int,
    folder: Path,
):
    """Train one model as the training jobs do (their setup and loop, checkpoint and early
    stopping on ``val``) for at most ``settings["epochs"]`` or ``budget`` seconds of ``clock``;
    returns the setup (its model holding the chosen weights) and what the training cost."""
    seed_everything(seed)
    resume = folder / "resume"
    shutil.rmtree(resume, ignore_errors=True)
    setup = build_training_setup(task, settings, loader(data), train, val, CPU, seed)
    fit_settings = FitSettings.from_settings(settings, seed, setup.metric_name)
    if task == "segmentation":
        fit_settings.select_on = selection_column(settings)
    tick = clock_of(clock)
    start = tick()
    try:
        result = fit(
            setup.model, setup.loss_fn, setup.metric_fn,
            budgeted(setup.train_batches, tick, budget), setup.val_batches,
            fit_settings, CPU, resume, "quality", setup.plan,
        )  # fmt: skip
        best, history, stopped = result.best_state, result.history, "epochs"
    except BudgetSpent:
        state = safe_torch_load(resume / "state.pt")
        best, history, stopped = state["best_state"], state["history"], "budget"
    seconds = tick() - start
    setup.model.load_state_dict(best)
    shutil.rmtree(resume, ignore_errors=True)
    pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
    chosen = [row["epoch"] for row in history if row.get("best")]
    return setup, {
        "seconds": round(seconds, 1),
        "epochs_run": len(history),
        "best_epoch": chosen[-1] if chosen else None,
        "stopped_by": stopped,
        "train_slices": len(train),
    }


def train_segmenter(settings, data, train, val, budget, clock, seed, folder) -> dict[str, Any]:
    """:func:`budgeted_fit` of a recipe segmenter, saved as ``<folder>/model.pt``."""
    setup, info = budgeted_fit(
        "segmentation", settings, data, train, val, budget, clock, seed, folder
    )
    save_checkpoint(folder / "model.pt", setup.model, "segmentation", settings)
    return info


def train_plain(
    settings: dict[str, Any],
    data: Path,
    train: pd.DataFrame,
    budget: float,
    clock: str,
    seed: int,
    folder: Path,
) -> dict[str, Any]:
    """bench/plain_loop.py's loop on ``train`` (no validation: it keeps its last weights), saved
    as a checkpoint the inference path loads (inputs in [0, 1], no normalisation)."""
    from bench.plain_loop import as_tensor, train_plain_loop

    size = settings["input_size"]
    x = as_tensor(gather(data, train), size)
    masks = torch.from_numpy(gather(data, train, "masks")).float()[:, None]
    y = torch.nn.functional.interpolate(masks, size=size)
    model, info = train_plain_loop(
        x, y, settings["encoder"], budget, clock_of(clock), settings["batch_size"],
        settings["lr"], seed,
    )  # fmt: skip
    wrapped = Normalized(model, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    save_checkpoint(folder / "model.pt", wrapped, "segmentation", settings)
    return {**info, "train_slices": len(train)}


def classifier_probabilities(setup, rows: pd.DataFrame) -> np.ndarray:
    """P(tumor) of ``rows`` by a trained classifier setup."""
    logits = predict_logits(setup.model, setup.batches(rows).epoch(), CPU)
    return torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float64)


def segment(model: Path, data: Path, rows: pd.DataFrame, tta: bool, flair: bool) -> np.ndarray:
    """Stored uint8 probabilities (N, S, S) of ``rows`` by the checkpoint ``model`` through the
    evaluation's inference path; ``flair``: with the FLAIR-only images."""
    from brainmri.inference.segment import stored_probabilities

    images = gather(data, rows)
    if flair:
        images = flair_only(images)
    stored, _ = stored_probabilities([model], images, CPU, tta, rows.reset_index(drop=True))
    return stored.cpu().numpy()


def write_info(path: Path, info: dict[str, Any]) -> None:
    """A fold model's info.json, written last (atomically): its presence marks the fold done."""
    write_text(path, json.dumps(info, indent=1, sort_keys=True) + "\n")


def setup_threads(threads: int) -> None:
    configure_torch(CPU, threads)
