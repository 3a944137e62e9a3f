"""Train one model: a timm classifier (tumor / no tumor; also writes its test-set probabilities)
or a segmentation architecture on one cross-validation fold (soft Dice loss). Keeps the
best-validation-loss checkpoint, records the device in --device-json; resumes after a kill;
exits 143 on SIGTERM."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from brainmri.io import run_cli, setup_logging
from brainmri.tables import array_files
from brainmri.training.jobs import Preempted, TrainJob, train_classifier, train_segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=["classification", "segmentation"])
    parser.add_argument("--settings", required=True, help="JSON of the model's settings")
    parser.add_argument("--fold", type=int, help="segmentation: the validation fold")
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
        if segmentation:
            train_segmenter(job, args.fold)
        else:
            train_classifier(job, args.predictions)
    except Preempted as stop:
        log.warning("%s; the next run resumes from the last completed epoch", stop)
        sys.exit(143)


if __name__ == "__main__":
    run_cli(main)
