"""Fold ensemble of one architecture: the mean of the fold models' stored test probabilities,
thresholded, cleaned per patient volume (segmentation.postprocess) and scored like a single
model (test set: per-slice metrics with the empty-mask rules, tumor and all slices, per-patient
volume Dice)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import brainmri.evaluation.masks as stored
from brainmri.evaluation.postprocess import PostProcess
from brainmri.evaluation.segmentation import evaluate_split
from brainmri.io import run_cli, setup_logging, write_csv, write_json, write_npy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probabilities", nargs="+", required=True, type=Path)
    stored.add_test_set_arguments(parser)
    parser.add_argument(
        "--postprocess", default="{}", help="JSON of segmentation.postprocess (per patient, 3D)"
    )
    parser.add_argument("--output-probabilities", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    rows, masks = stored.load_test_set(args)
    folds = [stored.load_probabilities(path, masks.shape) for path in args.probabilities]
    mean = stored.mean_probabilities(folds)
    post = PostProcess.from_settings(json.loads(args.postprocess))
    frame, report = evaluate_split(rows, mean, masks, args.threshold, "test", args.threads, post)
    report.update(models=len(folds))  # no paths: the JSON must not depend on the results dir
    write_npy(args.output_probabilities, mean)
    write_csv(args.per_slice, frame)
    write_json(args.metrics, report)
    tumor = report["tumor_slices"]["dice"]["mean"]
    log.info(
        "Fold ensemble of %d models on %d test slices: Dice %s (tumor slices), %.4f (all), "
        "volume Dice %.4f",
        len(folds),
        len(rows),
        "n/a" if tumor is None else f"{tumor:.4f}",
        report["all_slices"]["dice"]["mean"],
        report["volume_dice"]["mean"],
    )


if __name__ == "__main__":
    run_cli(main)
