"""The classify-then-segment cascade on the whole LGG test set, compared with the segmentation
fold ensemble alone: per-slice Dice (empty-mask rules), volume Dice, slice-level detection,
and the tumor area the classifier gate lost."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.cascade import comparison_table, run_cascade
from brainmri.data import load_table
from brainmri.io import InputError, run_cli, setup_logging, write_csv, write_json


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
    table = load_table(args.manifest, args.splits)
    rows = table[table["seg_split"] == "test"].reset_index(drop=True)
    decisions = pd.read_csv(args.classifier).set_index("id")
    missing = set(rows["id"]) - set(decisions.index)
    if missing:
        raise InputError(f"{args.classifier}: no decision for {len(missing)} test slices")
    gate = decisions.loc[rows["id"], "pred"].to_numpy().astype(bool)
    probabilities = np.load(args.probabilities).astype(np.float32) / 255
    if len(probabilities) != len(rows):
        raise InputError(f"{args.probabilities}: {len(probabilities)} slices, expected {len(rows)}")
    truth = np.load(args.masks, mmap_mode="r")[rows["array_index"].to_numpy()].astype(bool)
    per_slice, results = run_cascade(gate, probabilities, truth, rows, args.threshold, args.threads)
    results.update(architecture=args.architecture, threshold=args.threshold, n_slices=len(rows))
    comparison = comparison_table(results)
    write_csv(args.per_slice, per_slice)
    write_csv(args.table, comparison, sep="\t", float_format="%.4f")
    write_json(args.metrics, results)
    log.info("Cascade (%s):\n%s", args.architecture, comparison.to_string(index=False))


if __name__ == "__main__":
    run_cli(main)
