"""Fine-tune one timm backbone (tumor / no tumor), keep the best-validation-loss checkpoint, and
write its test-set predictions. Resumes after a kill; exits 143 on SIGTERM."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from brainmri.io import run_cli, setup_logging
from brainmri.training.jobs import Preempted, TrainJob, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--settings", required=True, help="JSON of the backbone's settings")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--weights", default="", help="cached ImageNet weights (if pretrained)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--history", required=True, type=Path)
    parser.add_argument("--predictions", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    settings = json.loads(args.settings)
    settings.setdefault("backbone", args.backbone)
    job = TrainJob(
        settings,
        args.manifest,
        args.splits,
        args.data_dir,
        args.weights or None,
        args.seed,
        args.threads,
        args.checkpoint,
        args.history,
    )
    try:
        train_classifier(job, args.predictions)
    except Preempted as stop:
        log.warning("%s; the next run resumes from the last completed epoch", stop)
        sys.exit(143)


if __name__ == "__main__":
    run_cli(main)
