"""Predict on whole patient volumes with trained models: per-slice tumor probability and
decision, a 3-D mask in the input's geometry, the tumor volume and an overview montage.

A patient is a Kaggle-layout folder (<patient>_<n>.tif), a folder of NIfTI files named
<...>_pre, <...>_flair, <...>_post (.nii/.nii.gz; FLAIR required, a missing one is replaced by
FLAIR), one NIfTI with the three sequences along a 4th dimension, or a folder of DICOM files (any
nesting; series found by SeriesDescription, --dicom-series). Every input's header is checked
against the size caps (--limits) before its data are decoded. A patient that cannot be read,
predicted or written is skipped with one line (its traceback in --details), listed in its CSV
row and in --failures; the others are kept. Exit status: 0 when every patient was predicted, 1
when any was skipped (--allow-skipped: 0 all the same, as the workflow's rule runs it, so that
Snakemake keeps the good patients' outputs).

  python workflow_scripts/predict_volume.py --inputs patient1/ patient2.nii.gz \\
      --classifiers results/classification/*/model.pt \\
      --segmenters results/segmentation/unet/fold*/model.pt --method majority \\
      --classifier-threshold 0.5 --segmentation-threshold 0.5 \\
      --segmentation-voter results/classification/segvoter/min_pixels.json --smooth-window 1 \\
      --csv out/volumes.csv --patients-dir out/patients

The decision is the run's ensemble (brainmri/evaluation/decision.py), as evaluated: the
classifiers and, with --segmentation-voter (the run's min_pixels.json, when
classification.segmentation_voter is on), the segmentation voter with the run's k; then
--smooth-window (classification.smooth_window) along each patient's slice order.
The models are loaded once for all patients.

Slices are resized to the preprocessing size the checkpoints record (data.array_size).
--tta (segmentation.tta) averages each segmenter over flips; --postprocess (a JSON object of
segmentation.postprocess, e.g. '{"min_component_voxels": 16, "keep_largest": true}') cleans
each patient's stacked masks in 3-D at that size; both default to off, as in the paper.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from brainmri.accelerator import configure_torch
from brainmri.data.limits import Limits
from brainmri.devices import select_device
from brainmri.evaluation.decision import add_ensemble_arguments, ensemble_rule
from brainmri.inference.dicom_io import rules_from_settings
from brainmri.inference.ensemble import EnsembleModels
from brainmri.inference.predict import array_size
from brainmri.inference.stored import AXES
from brainmri.inference.volume import predict_volumes
from brainmri.inference.volume_io import read_input, read_nifti_files
from brainmri.io import run_cli, setup_logging, write_csv
from brainmri.untrusted import csv_safe_frame


def limits_arg(text: str) -> Limits:
    """--limits: a JSON object of predict.limits (missing keys keep their defaults)."""
    try:
        return Limits.from_json(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def dicom_series_arg(text: str):
    """--dicom-series: predict.dicom.series as JSON, [{"sequence": ..., "pattern": ...}, ...]."""
    try:
        settings = json.loads(text)
        if not isinstance(settings, list) or not all(
            isinstance(i, dict) and set(i) == {"sequence", "pattern"} for i in settings
        ):
            raise ValueError(f'expected [{{"sequence": ..., "pattern": ...}}, ...], not {text}')
        return rules_from_settings(settings)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--inputs", nargs="*", type=Path, default=[], help="patients")
    parser.add_argument("--flair", type=Path, help="one patient as sequence files: FLAIR ...")
    parser.add_argument("--pre", type=Path, help="... pre-contrast (optional)")
    parser.add_argument("--post", type=Path, help="... post-contrast (optional)")
    parser.add_argument("--name", help="patient name for --flair (default: its folder's name)")
    parser.add_argument("--classifiers", nargs="+", type=Path, required=True)
    parser.add_argument("--segmenters", nargs="+", type=Path, required=True)
    add_ensemble_arguments(parser)
    parser.add_argument("--axis", choices=sorted(AXES), default="axial")
    parser.add_argument(
        "--limits",
        type=limits_arg,
        default="{}",
        help="JSON of predict.limits: size caps checked on headers before decoding",
    )
    parser.add_argument(
        "--dicom-series",
        type=dicom_series_arg,
        default="[]",
        help="JSON of predict.dicom.series: [{sequence, pattern}, ...] ([] = the built-in rules)",
    )
    parser.add_argument("--csv", type=Path, required=True, help="one row per patient")
    parser.add_argument("--patients-dir", type=Path, required=True, help="one folder per patient")
    parser.add_argument(
        "--failures", type=Path, help="CSV of the patients skipped (default: beside --csv)"
    )
    parser.add_argument(
        "--details",
        type=Path,
        help="the errors with their tracebacks (default: failures.log beside --failures)",
    )
    parser.add_argument(
        "--allow-skipped",
        action="store_true",
        help="exit with status 0 even if a patient was skipped",
    )
    args = parser.parse_args()
    if (args.pre or args.post or args.name) and not args.flair:
        parser.error("--pre, --post and --name go with --flair")
    readers = [
        (str(p), functools.partial(read_input, p, args.axis, args.limits, args.dicom_series))
        for p in args.inputs
    ]
    if args.flair:
        files = {"FLAIR": args.flair, "pre-contrast": args.pre, "post-contrast": args.post}
        files = {k: v for k, v in files.items() if v is not None}
        name = args.name or args.flair.resolve().parent.name
        read = functools.partial(
            read_nifti_files, files, args.axis, name, str(args.flair), args.limits
        )
        readers.append((str(args.flair), read))
    if not readers:
        parser.error("give --inputs and/or --flair")
    failures_csv = args.failures or args.csv.parent / "failures.csv"
    log = setup_logging(details=args.details or failures_csv.with_suffix(".log"))
    size = array_size([*args.classifiers, *args.segmenters])
    rule = ensemble_rule(args)
    device = select_device(log)
    configure_torch(device, torch.get_num_threads())  # cuDNN / determinism flags as in training
    models = EnsembleModels(args.classifiers, args.segmenters, rule, device, args.tta)
    log.info("Voters: %s", ", ".join(models.voters))
    failures = predict_volumes(
        readers,
        models,
        size,
        args.segmentation_threshold,
        args.patients_dir,
        args.csv,
        args.postprocess,
    )
    write_csv(failures_csv, csv_safe_frame(pd.DataFrame(failures, columns=["input", "error"])))
    log.info("Volumes written to %s and %s", args.csv, args.patients_dir)
    if failures:
        print(
            f"{len(failures)} of {len(readers)} patient(s) skipped:\n"
            + "\n".join(m for _, m in failures),
            file=sys.stderr,
        )
        if not args.allow_skipped:
            sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
