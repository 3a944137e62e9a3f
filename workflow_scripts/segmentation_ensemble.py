"""Fold ensemble of one architecture: the mean of the fold models' test probabilities,
thresholded and scored like a single model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from brainmri.data import load_table
from brainmri.io import InputError, run_cli, setup_logging, write_csv, write_json, write_npy
from brainmri.metrics import per_slice_metrics, segmentation_report, volume_dice


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
    table = load_table(args.manifest, args.splits)
    rows = table[table["seg_split"] == "test"]
    total = None
    for path in args.probabilities:
        fold = np.load(path).astype(np.float32) / 255
        if fold.shape[0] != len(rows):
            raise InputError(f"{path}: {fold.shape[0]} slices, the test set has {len(rows)}")
        total = fold if total is None else total + fold
    probabilities = total / len(args.probabilities)
    masks = np.load(args.masks, mmap_mode="r")[rows["array_index"].to_numpy()].astype(bool)
    pred = probabilities >= args.threshold
    frame = per_slice_metrics(pred, masks, args.threads)
    frame.insert(0, "has_tumor", rows["has_tumor"].to_numpy())
    frame.insert(0, "patient", rows["patient"].to_numpy())
    frame.insert(0, "id", rows["id"].to_numpy())
    report = segmentation_report(frame, volume_dice(pred, masks, rows["patient"].to_numpy()))
    report.update(models=len(args.probabilities), split="test", threshold=args.threshold)
    write_npy(args.output_probabilities, np.round(probabilities * 255).astype(np.uint8))
    write_csv(args.per_slice, frame.assign(split="test"))
    write_json(args.metrics, report)
    log.info(
        "Fold ensemble of %d models: test Dice %.4f (tumor slices), volume Dice %.4f",
        len(args.probabilities),
        report["tumor_slices"]["dice"]["mean"] or 0,
        report["volume_dice"]["mean"] or 0,
    )


if __name__ == "__main__":
    run_cli(main)
