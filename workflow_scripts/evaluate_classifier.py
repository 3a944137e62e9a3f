"""Evaluate one classifier (or the ensemble) on the LGG test set: the paper's Fig. 3 table
(scikit-learn classification_report), confusion matrix, ROC AUC, and a gallery of up to 8 false
negatives and 8 false positives, the most confident first (Fig. 4)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainmri.evaluation.classification import (
    check_ids_in_manifest,
    classification_errors,
    classification_metrics,
    fig3_table,
    read_predictions,
)
from brainmri.io import run_cli, setup_logging, write_csv, write_json
from brainmri.reporting.plotting import (
    confusion_figure,
    error_gallery,
    load_gallery_items,
    save_figure,
)
from brainmri.tables import array_files, read_manifest

GALLERY_SIZE = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--predictions", required=True, type=Path)
    parser.add_argument(
        "--threshold",
        type=float,
        required=True,
        help="classifier cut-off for a single model's probabilities (an ensemble's vote is kept)",
    )
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--images", nargs="+", required=True, help="SOURCE=images.npy pairs")
    parser.add_argument("--masks", nargs="+", required=True, help="SOURCE=masks.npy pairs")
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--table", required=True, type=Path)
    parser.add_argument("--confusion", required=True, type=Path)
    parser.add_argument("--gallery", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    predictions = read_predictions(args.predictions, args.threshold)
    manifest = read_manifest(args.manifest)
    check_ids_in_manifest(predictions["id"], manifest, args.predictions)
    metrics = classification_metrics(
        predictions["label"].to_numpy(),
        predictions["pred"].to_numpy(),
        predictions["prob_tumor"].to_numpy(),
    )
    metrics.update(model=args.model, threshold=args.threshold)
    table = fig3_table(metrics)
    fn, fp = classification_errors(predictions, GALLERY_SIZE)
    images, masks = array_files(args.images, "--images"), array_files(args.masks, "--masks")
    errors = {
        "false negatives": load_gallery_items(fn, manifest, images, masks),
        "false positives": load_gallery_items(fp, manifest, images, masks),
    }
    totals = {
        "false negatives": metrics["false_negatives"],
        "false positives": metrics["false_positives"],
    }
    gallery = error_gallery(errors, f"{args.model}: errors on the test set", totals)
    save_figure(confusion_figure(metrics["confusion_matrix"], args.model), args.confusion)
    save_figure(gallery, args.gallery)
    write_csv(args.table, table, sep="\t", float_format="%.4f")
    write_json(args.metrics, metrics)
    log.info(
        "%s:\n%s\nROC AUC %s",
        args.model,
        table.to_string(index=False),
        metrics["roc_auc"] if metrics["roc_auc"] is not None else metrics["roc_auc_note"],
    )


if __name__ == "__main__":
    run_cli(main)
