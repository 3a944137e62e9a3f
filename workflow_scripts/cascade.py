"""The classify-then-segment cascade on the whole LGG test set, compared with the segmentation
fold ensemble alone: the classifier ensemble decides tumor / no tumor per slice; tumor slices
get the ensemble's mask, the others an empty mask. Per-slice Dice (empty-mask rules), volume
Dice, slice-level detection, and the tumor area the gate lost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import brainmri.evaluation.masks as stored
from brainmri.evaluation.cascade import comparison_table, gate_from_classifier, run_cascade
from brainmri.evaluation.classification import read_predictions
from brainmri.evaluation.postprocess import PostProcess, clean_patients
from brainmri.io import run_cli, setup_logging, write_csv, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classifier", required=True, type=Path, help="ensemble predictions")
    parser.add_argument("--probabilities", required=True, type=Path, help="segmentation ensemble")
    parser.add_argument("--architecture", required=True)
    stored.add_test_set_arguments(parser)
    parser.add_argument(
        "--postprocess", default="{}", help="JSON of segmentation.postprocess (per patient, 3D)"
    )
    parser.add_argument("--table", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    rows, truth = stored.load_test_set(args)
    gate = gate_from_classifier(read_predictions(args.classifier), rows, args.classifier)
    probabilities = stored.load_probabilities(args.probabilities, truth.shape)
    seg_masks = stored.binarize(probabilities, args.threshold)
    post = PostProcess.from_settings(json.loads(args.postprocess))
    seg_masks = clean_patients(seg_masks, rows, post)
    per_slice, results = run_cascade(gate, seg_masks, truth, rows, args.threads)
    results.update(
        architecture=args.architecture,
        threshold=args.threshold,
        postprocess=post.as_dict(),
        n_slices=len(rows),
    )
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
