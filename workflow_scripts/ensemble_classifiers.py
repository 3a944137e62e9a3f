"""Ensemble the backbones' test predictions: majority vote (the paper) or soft vote.

A tie of the majority vote (an even number of backbones) goes to the mean probability
(>= 0.5: tumor)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.io import InputError, run_cli, setup_logging, write_csv
from brainmri.metrics import vote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["majority", "soft"], default="majority")
    parser.add_argument("--predictions", nargs="+", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    frames = [pd.read_csv(path) for path in args.predictions]
    reference = frames[0]
    for path, frame in zip(args.predictions[1:], frames[1:], strict=True):
        if not frame["id"].equals(reference["id"]):
            raise InputError(f"{path}: its ids differ from those of {args.predictions[0]}")
    preds = np.stack([f["pred"].to_numpy() for f in frames])
    probs = np.stack([f["prob_tumor"].to_numpy() for f in frames])
    pred, mean_prob, votes = vote(preds, probs, args.method)
    ties = int((2 * votes == len(frames)).sum()) if args.method == "majority" else 0
    result = reference[["id", "patient", "label"]].assign(
        prob_tumor=np.round(mean_prob, 6), pred=pred, votes=votes
    )
    write_csv(args.output, result)
    accuracy = float((result["pred"] == result["label"]).mean())
    log.info(
        "%s vote of %d models: accuracy %.4f, %d ties broken by the mean probability",
        args.method,
        len(frames),
        accuracy,
        ties,
    )


if __name__ == "__main__":
    run_cli(main)
