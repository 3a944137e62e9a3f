"""Fold ensemble of one architecture: the mean of the fold models' stored test probabilities,
thresholded and scored like a single model (test set: per-slice metrics with the empty-mask
rules, tumor and all slices, per-patient volume Dice)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainmri.errors import InputError
from brainmri.evaluation.masks import load_masks, load_probabilities, mean_probabilities
from brainmri.evaluation.segmentation import evaluate_split
from brainmri.io import run_cli, setup_logging, write_csv, write_json, write_npy
from brainmri.tables import load_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probabilities", nargs="+", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--masks", required=True, type=Path)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--per-slice", required=True, type=Path)
    parser.add_argument("--output-probabilities", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold {args.threshold}: must lie strictly between 0 and 1")
    table = load_table(args.manifest, args.splits)
    rows = table[table["seg_split"] == "test"]
    if rows.empty:
        raise InputError(f"{args.splits}: no LGG slices with seg_split test")
    masks = load_masks(args.masks, rows)
    folds = [load_probabilities(path, masks.shape) for path in args.probabilities]
    stored = mean_probabilities(folds)
    frame, report = evaluate_split(rows, stored, masks, args.threshold, "test", args.threads)
    report.update(models=len(folds))  # no paths: the JSON must not depend on the results dir
    write_npy(args.output_probabilities, stored)
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
