"""Ensemble the backbones' test predictions: majority vote (the paper) or soft vote.

majority: each backbone's decision (``prob_tumor`` >= the cut-off --threshold) is one vote; a tie
(an even number of backbones) goes to the mean probability (>= the cut-off: tumor). soft: the
mean ``prob_tumor`` >= the cut-off. The output has a
backbone's columns (``prob_tumor`` = the mean probability) plus ``votes`` (tumor votes). Every
input must hold the same ids in the same order (the segmentation voter's table is one more
input). Optionally each decision then becomes the majority of its neighbours along the patient's
slice order (--smooth-window, brainmri.evaluation.voting)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainmri.errors import InputError
from brainmri.evaluation.classification import ensemble_predictions, read_predictions
from brainmri.evaluation.voting import smooth_decisions
from brainmri.io import run_cli, setup_logging, write_csv
from brainmri.tables import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["majority", "soft"], required=True)
    parser.add_argument("--threshold", type=float, required=True, help="classifier cut-off")
    parser.add_argument("--predictions", nargs="+", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--smooth-window", type=int, default=1, help="odd; 1 = no smoothing")
    parser.add_argument("--manifest", type=Path, help="slice order, for --smooth-window > 1")
    args = parser.parse_args()
    log = setup_logging()
    frames = {str(path): read_predictions(path, args.threshold) for path in args.predictions}
    if len(frames) != len(args.predictions):
        raise ValueError("--predictions: the same file is given twice")
    result, ties = ensemble_predictions(frames, args.method, args.threshold)
    if args.smooth_window != 1:
        if args.manifest is None:
            raise ValueError("--smooth-window needs --manifest (the slices' order)")
        order = read_manifest(args.manifest).set_index("id")["slice_index"]
        missing = [name for name in result["id"] if name not in order.index]
        if missing:
            raise InputError(f"{args.manifest}: no slice {missing[0]!r} of the predictions")
        before = result["pred"].to_numpy()
        result["pred"] = smooth_decisions(
            before,
            result["patient"].to_numpy(),
            order.loc[result["id"]].to_numpy(),
            args.smooth_window,
        )
        log.info(
            "Smoothing along the slice order (window %d) changed %d decisions",
            args.smooth_window,
            int((before != result["pred"].to_numpy()).sum()),
        )
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
