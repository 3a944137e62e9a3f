"""Evaluate one fold model on its validation fold (seg_split train, fold k) and on the common
test set: per-slice Dice, Jaccard, Hausdorff distance and ASSD (medpy; empty-mask rules in
brainmri.evaluation.segmentation) on tumor-containing slices and on all slices, and per-patient
volume Dice. The overlap sums behind Dice, Jaccard and volume Dice are taken on the inference
device (brainmri.inference.overlap); HD and ASSD on the CPU (medpy, --threads processes).
Also writes the model's test probabilities (uint8, x 255) for the fold ensemble.
With --fold all (the final model, trained on every fold) there is no validation fold: the test
set only, cleaned per patient volume by --postprocess as the fold ensemble is (the overlap sums
are then taken after the cleaning, on the host)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from brainmri.evaluation.postprocess import PostProcess
from brainmri.evaluation.segmentation import evaluate_split
from brainmri.inference.segment import segment_and_count
from brainmri.io import run_cli, setup_logging, write_csv, write_json, write_npy
from brainmri.tables import segmentation_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument(
        "--fold", required=True, type=lambda t: t if t == "all" else int(t), help="k, or all"
    )
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="data/lgg/images.npy")
    parser.add_argument("--masks", required=True, type=Path, help="data/lgg/masks.npy")
    parser.add_argument("--threshold", type=float, required=True, help="segmentation threshold")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tta", action="store_true", help="test-time flips (segmentation.tta)")
    parser.add_argument(
        "--postprocess", default="{}", help="--fold all: JSON of segmentation.postprocess"
    )
    parser.add_argument("--val-metrics", type=Path, help="required unless --fold all")
    parser.add_argument("--test-metrics", required=True, type=Path)
    parser.add_argument("--per-slice", required=True, type=Path)
    parser.add_argument("--test-probabilities", required=True, type=Path)
    args = parser.parse_args()
    final = args.fold == "all"
    if final == (args.val_metrics is not None):
        parser.error("--val-metrics is required with a fold number and refused with --fold all")
    if not final and args.postprocess != "{}":
        parser.error("--postprocess is for --fold all (fold models: the fold ensemble's)")
    post = PostProcess.from_settings(json.loads(args.postprocess)) if final else None
    log = setup_logging()
    parts = {} if final else {"val": segmentation_rows(args.manifest, args.splits, args.fold)}
    parts["test"] = segmentation_rows(args.manifest, args.splits)
    start = time.perf_counter()
    rows = pd.concat(parts.values(), ignore_index=True)
    scored = segment_and_count(
        [args.checkpoint],
        rows,
        {"lgg": args.images},
        {"lgg": args.masks},
        args.threads,
        None if post is not None else args.threshold,  # cleaned masks are counted on the host
        args.tta,
    )
    stored, masks, counts = scored.stored, scored.truth, scored.counts
    checkpoint = scored.checkpoint
    seconds = time.perf_counter() - start
    log.info("Inference and overlap sums on %d slices: %.1f s", len(rows), seconds)
    arch = checkpoint["settings"].get("name", checkpoint["settings"].get("arch"))
    frames, reports, offset = [], {}, 0
    for split, part in parts.items():
        end = offset + len(part)
        frame, report = evaluate_split(
            part,
            stored[offset:end],
            masks[offset:end],
            args.threshold,
            split,
            args.threads,
            post,
            counts=None if counts is None else counts[offset:end],
        )
        report.update(arch=arch, fold=args.fold, input_size=checkpoint["input_size"], tta=args.tta)
        if final:  # what the final model was trained on, from its checkpoint
            report.update(epochs=checkpoint["epoch"], patients=checkpoint["training_patients"])
        frames.append(frame)
        reports[split] = report
        if split == "test":
            test_probabilities = stored[offset:end]
        offset = end
        tumor = report["tumor_slices"]["dice"]["mean"]
        log.info(
            "%s fold %s %s (%d slices): Dice %s (tumor slices), %.4f (all), volume Dice %.4f",
            arch,
            args.fold,
            split,
            len(part),
            "n/a" if tumor is None else f"{tumor:.4f}",
            report["all_slices"]["dice"]["mean"],
            report["volume_dice"]["mean"],
        )
    write_npy(args.test_probabilities, test_probabilities)
    write_csv(args.per_slice, pd.concat(frames, ignore_index=True))
    if not final:
        write_json(args.val_metrics, reports["val"])
    write_json(args.test_metrics, reports["test"])
    log.info("Evaluation done: %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(main)
