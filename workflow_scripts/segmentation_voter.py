"""The segmentation fold ensemble as one more classifier: a test slice is called tumor when the
ensemble's thresholded, per-volume post-processed mask has at least k pixels. k is given, or
chosen on the out-of-fold validation slices (the fold models' per_slice.csv, split val).
Writes a table in a backbone's format (test_predictions.csv) and the choice of k (JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.errors import InputError
from brainmri.evaluation.masks import load_probabilities
from brainmri.evaluation.postprocess import PostProcess
from brainmri.evaluation.voting import choose_min_pixels, mask_areas, voter_table
from brainmri.io import run_cli, setup_logging, write_csv, write_json
from brainmri.tables import load_table


def validation_areas(paths: list[Path]) -> pd.DataFrame:
    """pred_area and has_tumor of the validation rows of the fold models' per_slice.csv."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path, keep_default_na=False)
        missing = {"split", "pred_area", "has_tumor"} - set(frame.columns)
        if missing:
            raise InputError(f"{path}: missing column(s) {sorted(missing)}")
        frames.append(frame[frame["split"] == "val"])
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probabilities", required=True, type=Path, help="ensemble, test")
    parser.add_argument("--fold-slices", nargs="+", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--postprocess", default="{}")
    parser.add_argument("--min-pixels", default="auto", help="k, or auto (chosen on validation)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--choice", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    table = load_table(args.manifest, args.splits)
    seg_rows = table[table["seg_split"] == "test"]
    cls_rows = table[table["cls_split"] == "test"]
    stored = np.load(args.probabilities, mmap_mode="r", allow_pickle=False)
    stored = load_probabilities(args.probabilities, (len(seg_rows), *stored.shape[1:]))
    post = PostProcess.from_settings(json.loads(args.postprocess))
    areas = mask_areas(stored, seg_rows, args.threshold, post)
    area_of = dict(zip(seg_rows["id"], areas, strict=True))
    missing = [name for name in cls_rows["id"] if name not in area_of]
    if missing:
        raise InputError(
            f"{args.splits}: {len(missing)} classification test slices are not segmentation "
            f"test slices (e.g. {missing[0]!r}); the segmentation voter needs the same test set"
        )
    val = validation_areas(args.fold_slices)
    val_k, val_accuracy = choose_min_pixels(val["pred_area"], val["has_tumor"])
    k = val_k if args.min_pixels == "auto" else int(args.min_pixels)
    if k < 1:
        raise ValueError(f"--min-pixels {k}: must be at least 1")
    frame = voter_table(cls_rows, np.array([area_of[i] for i in cls_rows["id"]]), k)
    write_csv(args.output, frame)
    write_json(
        args.choice,
        {
            "min_pixels": k,
            "chosen_on_validation": args.min_pixels == "auto",
            "validation_best_min_pixels": val_k,
            "validation_accuracy": val_accuracy,
            "validation_slices": len(val),
            "postprocess": post.as_dict(),
            "threshold": args.threshold,
        },
    )
    log.info(
        "Segmentation voter: k = %d pixels (validation accuracy %.4f on %d slices), "
        "test accuracy %.4f on %d slices",
        k,
        val_accuracy,
        len(val),
        float((frame["pred"] == frame["label"]).mean()),
        len(frame),
    )


if __name__ == "__main__":
    run_cli(main)
