"""``kind: nnunet`` in the quality benchmark (bench/quality.py): nnU-Net v2 as a variant.

Per outer fold, under its model folder ``models/<variant>/fold<k>/``:

* ``nnUNet_raw/Dataset001_LGG``: the fold's training patients only (its train and inner
  validation patients; bench/nnunet_raw.py writes them), ``nnUNet_preprocessed`` with nnU-Net's
  fingerprint, plans, 2d preprocessing and a ``splits_final.json`` whose fold 0 trains on the
  train patients and validates on the inner validation ones;
* ``nnUNet_results``: nnU-Net's own training (bench/nnunet_run.py's ``nnUNetTrainerBudget``)
  under the variant's CPU-seconds budget;
* ``inputs/<part>``: the cases nnU-Net's predictor reads: ``val`` (inner validation patients,
  for the detector's k), ``test`` (the held-out patients) and ``flair`` (their FLAIR-only
  copies); ``outputs/<part>-mirror<0|1>``: its probabilities.

Each step runs in a process of its own (bench/nnunet_run.py); the probabilities go back to the
manifest's slice order and the benchmark's stored uint8 form, and are scored like every variant.
The variant's ``tta`` is nnU-Net's mirroring (on by default, as nnU-Net predicts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import nnunet_raw as raw
from bench import quality_cv as cv
from brainmri.errors import InputError
from brainmri.evaluation.masks import quantize

log = logging.getLogger(__name__)
RUNNER = Path(__file__).resolve().with_name("nnunet_run.py")
INFERENCE = {"tta": True, "postprocess": {}, "threshold": 0.5}  # nnU-Net's argmax of 2 classes


def available() -> str | None:
    """None when nnunetv2 can be imported, else why not."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError as error:
        return f"nnunetv2 is not installed (pip install -r bench/requirements-nnunet.txt): {error}"
    return None


def run_step(root: Path, step: str, *extra: str, threads: int = 1) -> dict[str, Any]:
    """One step of bench/nnunet_run.py in its own process (nnU-Net's environment set); its
    info JSON."""
    info = root / f"{step}_info.json"
    info.unlink(missing_ok=True)
    env = {**os.environ, **_environment(root, step)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(RUNNER.parents[1]),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    command = [sys.executable, str(RUNNER), step, "--root", str(root), "--info", str(info), *extra]
    log_path = root / f"{step}.log"
    with log_path.open("a") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0 or not info.is_file():
        tail = log_path.read_text()[-2000:]
        raise InputError(f"nnU-Net {step} failed (exit {done.returncode}, log {log_path}):\n{tail}")
    return json.loads(info.read_text())


def _environment(root: Path, step: str) -> dict[str, str]:
    from bench.nnunet_run import environment

    return environment(root, step)


def write_fold(bench, fold: cv.Fold, root: Path) -> None:
    """The fold's raw dataset (train + inner validation patients), its split, and the cases
    to predict (``inputs/val``, ``inputs/test``, ``inputs/flair``)."""
    shutil.rmtree(root / "nnUNet_raw", ignore_errors=True)
    shutil.rmtree(root / "nnUNet_preprocessed", ignore_errors=True)
    training = raw.patient_cases(bench.data, bench.rows, fold.train + fold.val)
    raw.write_dataset(root / "nnUNet_raw", "Dataset001_LGG", training)
    raw.write_splits(root / "nnUNet_preprocessed" / "Dataset001_LGG", fold.train, fold.val)
    for part, patients in (("val", fold.val), ("test", fold.test), ("flair", fold.test)):
        folder = root / "inputs" / part
        shutil.rmtree(folder, ignore_errors=True)
        for case in raw.patient_cases(bench.data, bench.rows, patients, masks=False):
            if part == "flair":
                case = raw.Case(case.name, cv.flair_only(case.images), None, case.rows)
            raw.write_case(folder, None, case)


def train(bench, name: str, fold: cv.Fold, folder: Path) -> dict[str, Any]:
    """Write, plan, preprocess and train one fold model; what it cost (CPU seconds)."""
    reason = available()
    if reason:
        raise InputError(f"variant {name}: {reason}")
    root = folder
    write_fold(bench, fold, root)
    prepared = run_step(root, "prepare")
    trained = run_step(root, "train", "--budget", str(bench.budget(name)),
                       "--seed", str(bench.seed(fold)))  # fmt: skip
    import nnunetv2

    version = getattr(nnunetv2, "__version__", None) or _version("nnunetv2")
    return {**trained, **prepared, "nnunetv2": version,
            "train_slices": len(cv.of(bench.rows, fold.train))}  # fmt: skip


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def probabilities(bench, name: str, fold: cv.Fold, part: str) -> np.ndarray:
    """Stored uint8 probabilities (N, S, S) of a fold's ``val`` / ``test`` / ``flair`` slices
    in the benchmark's row order, by nnU-Net's predictor (mirroring = the variant's tta)."""
    root = bench.model_dir(name, fold)
    mirroring = bool(bench.inference(name)["tta"])
    output = root / "outputs" / f"{part}-mirror{int(mirroring)}"
    patients = fold.val if part == "val" else fold.test
    if not all((output / f"{p}.npy").is_file() for p in patients):
        extra = [] if mirroring else ["--no-mirroring"]
        run_step(root, "predict", "--inputs", str(root / "inputs" / part),
                 "--output", str(output), *extra)  # fmt: skip
    rows = cv.of(bench.rows, patients)
    stored = np.zeros((len(rows), *bench.truth.shape[1:]), dtype=np.uint8)
    position = {index: i for i, index in enumerate(rows.index)}
    for patient in patients:
        own = rows[rows["patient"] == patient].sort_values("slice_index", kind="stable")
        volume = np.load(output / f"{patient}.npy")
        if volume.shape != (len(own), *stored.shape[1:]):
            raise InputError(f"{output / patient}.npy: shape {volume.shape}, expected "
                             f"{(len(own), *stored.shape[1:])}")  # fmt: skip
        stored[[position[i] for i in own.index]] = quantize(volume)
    return stored
