"""The classify-then-segment cascade on the whole LGG test set, compared with the segmentation
fold ensemble alone: the classifier ensemble decides tumor / no tumor per slice; tumor slices
get the ensemble's mask, the others an empty mask. Per-slice Dice (empty-mask rules), volume
Dice, slice-level detection, and the tumor area the gate lost."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainmri.errors import InputError
from brainmri.evaluation.cascade import comparison_table, gate_from_classifier, run_cascade
from brainmri.evaluation.classification import read_predictions
from brainmri.evaluation.masks import binarize, load_masks, load_probabilities
from brainmri.io import run_cli, setup_logging, write_csv, write_json
from brainmri.tables import load_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classifier", required=True, type=Path, help="ensemble predictions")
    parser.add_argument("--probabilities", required=True, type=Path, help="segmentation ensemble")
    parser.add_argument("--architecture", required=True)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--masks", required=True, type=Path)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--per-slice", required=True, type=Path)
    parser.add_argument("--table", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold {args.threshold}: must lie strictly between 0 and 1")
    table = load_table(args.manifest, args.splits)
    rows = table[table["seg_split"] == "test"].reset_index(drop=True)
    if rows.empty:
        raise InputError(f"{args.splits}: no LGG slices with seg_split test")
    gate = gate_from_classifier(read_predictions(args.classifier), rows, args.classifier)
    truth = load_masks(args.masks, rows)
    seg_masks = binarize(load_probabilities(args.probabilities, truth.shape), args.threshold)
    per_slice, results = run_cascade(gate, seg_masks, truth, rows, args.threads)
    results.update(architecture=args.architecture, threshold=args.threshold, n_slices=len(rows))
    comparison = comparison_table(results)
    write_csv(args.per_slice, per_slice)
    write_csv(args.table, comparison, sep="\t", float_format="%.4f")
    write_json(args.metrics, results)
    gate_info = results["cascade"]["gate"]
    log.info(
        "Cascade (%s):\n%s\nThe gate dropped %d tumor slices (%.1f%% of the tumor area).",
        args.architecture,
        comparison.to_string(index=False),
        gate_info["tumor_slices_dropped"],
        100 * gate_info["tumor_area_lost_fraction"],
    )


if __name__ == "__main__":
    run_cli(main)
