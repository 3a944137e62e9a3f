"""Evaluate one fold model on its validation fold and on the common test set: per-slice Dice,
Jaccard, Hausdorff distance and ASSD (medpy; empty-mask rules in brainmri.metrics), on
tumor-containing slices and on all slices, and per-patient volume Dice."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.data import load_table
from brainmri.io import run_cli, setup_logging, write_csv, write_json, write_npy
from brainmri.metrics import per_slice_metrics, segmentation_report, volume_dice
from brainmri.segment import predict_probabilities


def evaluate(
    rows: pd.DataFrame, probabilities: np.ndarray, masks: np.ndarray, threshold: float, threads: int
) -> tuple[pd.DataFrame, dict]:
    pred = probabilities >= threshold
    frame = per_slice_metrics(pred, masks, threads)
    frame.insert(0, "has_tumor", rows["has_tumor"].to_numpy())
    frame.insert(0, "patient", rows["patient"].to_numpy())
    frame.insert(0, "id", rows["id"].to_numpy())
    volume = volume_dice(pred, masks, rows["patient"].to_numpy())
    return frame, segmentation_report(frame, volume)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--fold", required=True, type=int)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-metrics", required=True, type=Path)
    parser.add_argument("--test-metrics", required=True, type=Path)
    parser.add_argument("--per-slice", required=True, type=Path)
    parser.add_argument("--test-probabilities", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    table = load_table(args.manifest, args.splits)
    parts = {
        "val": table[(table["seg_split"] == "train") & (table["fold"] == args.fold)],
        "test": table[table["seg_split"] == "test"],
    }
    slices = []
    for split, rows in parts.items():
        probabilities, masks, checkpoint = predict_probabilities(
            [args.checkpoint], rows, args.data_dir, args.threads
        )
        frame, report = evaluate(rows, probabilities, masks, args.threshold, args.threads)
        settings = checkpoint["settings"]
        report.update(
            arch=settings["name"],
            fold=args.fold,
            split=split,
            threshold=args.threshold,
            n_slices=len(rows),
        )
        write_json(args.val_metrics if split == "val" else args.test_metrics, report)
        slices.append(frame.assign(split=split))
        if split == "test":
            write_npy(args.test_probabilities, np.round(probabilities * 255).astype(np.uint8))
        tumor = report["tumor_slices"]
        log.info(
            "%s fold %d %s: Dice %.4f (tumor slices), %.4f (all), volume Dice %.4f",
            settings["name"],
            args.fold,
            split,
            tumor["dice"]["mean"] or 0,
            report["all_slices"]["dice"]["mean"],
            report["volume_dice"]["mean"] or 0,
        )
    write_csv(args.per_slice, pd.concat(slices, ignore_index=True))


if __name__ == "__main__":
    run_cli(main)
