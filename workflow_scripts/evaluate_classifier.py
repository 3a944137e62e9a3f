"""Evaluate one classifier (or the ensemble) on the LGG test set: the paper's Fig. 3 table,
confusion matrix, ROC AUC and a gallery of false negatives and false positives (Fig. 4)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from brainmri.io import run_cli, setup_logging, write_csv, write_json
from brainmri.metrics import classification_metrics, fig3_table
from brainmri.plotting import confusion_figure, error_gallery, read_png, save_figure
from brainmri.preprocess import read_manifest

GALLERY_SIZE = 8


def gallery_items(errors: pd.DataFrame, manifest: pd.DataFrame, data_dir: Path) -> list:
    rows = manifest.set_index("id").loc[errors["id"]]
    items = []
    for (_, error), (_, row) in zip(errors.iterrows(), rows.iterrows(), strict=True):
        image = read_png(data_dir / row["image_path"])
        mask = read_png(data_dir / row["mask_path"]) > 127 if row["mask_path"] else None
        items.append((error["id"], image, mask, float(error["prob_tumor"])))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--predictions", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--table", required=True, type=Path)
    parser.add_argument("--confusion", required=True, type=Path)
    parser.add_argument("--gallery", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    predictions = pd.read_csv(args.predictions)
    labels, preds = predictions["label"].to_numpy(), predictions["pred"].to_numpy()
    metrics = classification_metrics(labels, preds, predictions["prob_tumor"].to_numpy())
    metrics["model"] = args.model
    table = fig3_table(metrics)
    manifest = read_manifest(args.manifest)
    # Most confident mistakes first.
    fn = predictions[(labels == 1) & (preds == 0)].sort_values("prob_tumor").head(GALLERY_SIZE)
    fp = predictions[(labels == 0) & (preds == 1)].sort_values("prob_tumor", ascending=False)
    fp = fp.head(GALLERY_SIZE)
    errors = {
        "false negatives": gallery_items(fn, manifest, args.data_dir),
        "false positives": gallery_items(fp, manifest, args.data_dir),
    }
    save_figure(confusion_figure(metrics["confusion_matrix"], args.model), args.confusion)
    save_figure(error_gallery(errors, f"{args.model}: errors on the test set"), args.gallery)
    write_csv(args.table, table, sep="\t", float_format="%.4f")
    write_json(args.metrics, metrics)
    log.info(
        "%s:\n%s\nROC AUC %s",
        args.model,
        table.to_string(index=False),
        metrics["roc_auc"] if metrics["roc_auc"] is not None else "n/a",
    )


if __name__ == "__main__":
    run_cli(main)
