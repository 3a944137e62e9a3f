"""Train one model: a timm classifier (tumor / no tumor; also writes its test-set probabilities)
or a segmentation architecture on one cross-validation fold (soft Dice loss), or with --fold all
on every training patient (the final model: fixed epochs, no validation, the last epoch kept).
Keeps the best-validation checkpoint, records the device in --device-json; resumes after a kill;
exits 143 on SIGTERM."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from brainmri.io import run_cli, setup_logging
from brainmri.tables import array_files
from brainmri.training.jobs import (
    Preempted,
    TrainJob,
    final_epochs,
    train_classifier,
    train_final_segmenter,
    train_segmenter,
)


def fold_argument(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or 'all', got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=["classification", "segmentation"])
    parser.add_argument("--settings", required=True, help="JSON of the model's settings")
    parser.add_argument(
        "--fold", type=fold_argument, help="segmentation: the validation fold, or all"
    )
    parser.add_argument("--epochs", type=int, help="--fold all: the number of epochs")
    parser.add_argument(
        "--fold-histories", nargs="+", type=Path, default=[],
        help="--fold all: the fold models' history.csv; epochs = median of their best epochs",
    )  # fmt: skip
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--images", nargs="+", required=True, help="SOURCE=images.npy pairs")
    parser.add_argument("--masks", nargs="+", default=[], help="SOURCE=masks.npy (segmentation)")
    parser.add_argument("--weights", default="", help="cached ImageNet weights (if pretrained)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--history", required=True, type=Path)
    parser.add_argument("--device-json", required=True, type=Path)
    parser.add_argument("--predictions", type=Path, help="classification: test predictions CSV")
    args = parser.parse_args()
    segmentation = args.stage == "segmentation"
    if segmentation and (args.fold is None or not args.masks):
        parser.error("segmentation needs --fold and --masks")
    final = args.fold == "all"
    if final and (args.epochs is None) == (not args.fold_histories):
        parser.error("--fold all needs exactly one of --epochs and --fold-histories")
    if not final and (args.epochs is not None or args.fold_histories):
        parser.error("--epochs and --fold-histories are for --fold all only")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs: {args.epochs} must be at least 1")
    if not segmentation and args.predictions is None:
        parser.error("classification needs --predictions")
    log = setup_logging()
    job = TrainJob(
        json.loads(args.settings),
        args.manifest,
        args.splits,
        array_files(args.images, "--images"),
        array_files(args.masks, "--masks") if segmentation else None,
        args.weights or None,
        args.seed,
        args.threads,
        args.checkpoint,
        args.history,
        args.device_json,
    )
    try:
        if final:
            epochs = args.epochs or final_epochs(args.fold_histories)
            log.info("Final model: %d epochs (%s)", epochs, "--epochs" if args.epochs else
                     "median of the fold models' best epochs")  # fmt: skip
            train_final_segmenter(job, epochs)
        elif segmentation:
            train_segmenter(job, args.fold)
        else:
            train_classifier(job, args.predictions)
    except Preempted as stop:
        log.warning("%s; the next run resumes from the last completed epoch", stop)
        sys.exit(143)


if __name__ == "__main__":
    run_cli(main)
