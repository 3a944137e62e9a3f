"""Ensemble the backbones' test predictions: majority vote (the paper), soft vote or the
segmentation voter alone, with the decision of brainmri.evaluation.decision (the one predict
and predict_volume use).

majority: each backbone's decision (``prob_tumor`` >= the cut-off --threshold) is one vote; a tie
(an even number of voters) goes to the mean probability (>= the cut-off: tumor). soft: the
mean ``prob_tumor`` >= the cut-off. The segmentation voter (--voter-table, its pred_area per
slice, and --voter-choice, its k) is one more vote; segmentation: the voter decides alone (it
needs --voter-table and --voter-choice; the backbones' votes are still counted). The output has
a backbone's columns (``prob_tumor`` = the mean probability; with segmentation, the voter's
0/1) plus ``votes`` (tumor votes of every voter) and, with the voter, ``segmentation_voter``
(its 0/1). Every input must hold the same ids in the same order.
Optionally each decision then becomes the majority of its neighbours along the patient's
slice order (--smooth-window, with --manifest for the order)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from brainmri.errors import InputError
from brainmri.evaluation.classification import read_predictions
from brainmri.evaluation.decision import METHODS, ensemble_predictions, read_voter_choice
from brainmri.io import run_cli, setup_logging, write_csv


def aligned(path: Path, column: str, ids: pd.Series) -> pd.Series:
    """``column`` of the table at ``path`` for ``ids`` (every id must be there)."""
    table = pd.read_csv(path, keep_default_na=False)
    if "id" not in table or column not in table:
        raise InputError(f"{path}: needs the columns id and {column}")
    table = table.set_index("id")
    missing = [name for name in ids if name not in table.index]
    if missing:
        raise InputError(f"{path}: no row for slice {missing[0]!r} of the predictions")
    return table.loc[ids, column]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--threshold", type=float, required=True, help="classifier cut-off")
    parser.add_argument("--predictions", nargs="+", required=True, type=Path)
    parser.add_argument("--voter-table", type=Path, help="segvoter/test_predictions.csv")
    parser.add_argument("--voter-choice", type=Path, help="segvoter/min_pixels.json (its k)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--smooth-window", type=int, default=1, help="odd; 1 = no smoothing")
    parser.add_argument("--manifest", type=Path, help="slice order, for --smooth-window > 1")
    args = parser.parse_args()
    log = setup_logging()
    if (args.voter_table is None) != (args.voter_choice is None):
        raise ValueError("--voter-table and --voter-choice go together")
    if args.method == "segmentation" and args.voter_table is None:
        raise InputError("--method segmentation needs --voter-table and --voter-choice")
    frames = {str(path): read_predictions(path, args.threshold) for path in args.predictions}
    if len(frames) != len(args.predictions):
        raise ValueError("--predictions: the same file is given twice")
    ids = next(iter(frames.values()))["id"]
    areas = k = None
    if args.voter_table is not None:
        areas = aligned(args.voter_table, "pred_area", ids).to_numpy(dtype=int)
        k = read_voter_choice(args.voter_choice)
    order = None
    if args.smooth_window != 1:
        if args.manifest is None:
            raise ValueError("--smooth-window needs --manifest (the slices' order)")
        slices = aligned(args.manifest, "slice_index", ids).to_numpy()
        order = (next(iter(frames.values()))["patient"].to_numpy(), slices)
    result, ties = ensemble_predictions(
        frames, args.method, args.threshold, areas, k, args.smooth_window, order
    )
    write_csv(args.output, result)
    decider = (
        f"the segmentation voter (k = {k}) alone, beside the votes of {len(frames)} models"
        if args.method == "segmentation"
        else f"{args.method} vote of {len(frames)} models"
        + ("" if k is None else f" and the segmentation voter (k = {k})")
    )
    log.info(
        "%s on %d slices (smoothing window %d): accuracy %.4f, "
        "%d ties broken by the mean probability",
        decider,
        len(result),
        args.smooth_window,
        float((result["pred"] == result["label"]).mean()),
        ties,
    )


if __name__ == "__main__":
    run_cli(main)
