"""Ensemble the backbones' test predictions: majority vote (the paper) or soft vote.

majority: each backbone's decision (``prob_tumor`` >= the cut-off --threshold) is one vote; a tie
(an even number of backbones) goes to the mean probability (>= the cut-off: tumor). soft: the
mean ``prob_tumor`` >= the cut-off. The output has a
backbone's columns (``prob_tumor`` = the mean probability) plus ``votes`` (tumor votes). Every
input must hold the same ids in the same order."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainmri.evaluation.classification import ensemble_predictions, read_predictions
from brainmri.io import run_cli, setup_logging, write_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["majority", "soft"], required=True)
    parser.add_argument("--threshold", type=float, required=True, help="classifier cut-off")
    parser.add_argument("--predictions", nargs="+", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    frames = {str(path): read_predictions(path, args.threshold) for path in args.predictions}
    if len(frames) != len(args.predictions):
        raise ValueError("--predictions: the same file is given twice")
    result, ties = ensemble_predictions(frames, args.method, args.threshold)
    write_csv(args.output, result)
    log.info(
        "%s vote of %d models on %d slices: accuracy %.4f, %d ties broken by the mean probability",
        args.method,
        len(frames),
        len(result),
        float((result["pred"] == result["label"]).mean()),
        ties,
    )


if __name__ == "__main__":
    run_cli(main)
