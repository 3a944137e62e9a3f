"""The paper's Table 1 (validation: mean ± std over the folds of each fold's mean) and Table 2
(test: mean ± std over the fold models, plus a row for the fold ensemble and, when given, one for
the all-patients model of segmentation.final_model), per architecture, on
tumor-containing slices, with all-slice and per-patient volume Dice beside; summary.json with
everything; all folds' per-slice rows; and the overlay figure (paper Fig. 6)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.errors import InputError
from brainmri.evaluation.masks import binarize, load_masks, load_probabilities
from brainmri.evaluation.segmentation import EMPTY_MASK_RULES
from brainmri.evaluation.summary import (
    TABLE_COLUMNS,
    ensemble_row,
    fold_summary,
    select_overlay_slices,
    single_model_summary,
    table_row,
)
from brainmri.io import read_json, run_cli, setup_logging, write_csv, write_json
from brainmri.reporting.plotting import message_figure, overlay_figure, save_figure
from brainmri.tables import segmentation_rows

OVERLAY_ROWS = 6


def read_fold_report(path: Path, arch: str, fold: int) -> dict:
    report = read_json(path)
    if report.get("fold") != fold or report.get("arch") != arch:
        raise InputError(
            f"{path}: holds arch {report.get('arch')!r} fold {report.get('fold')!r}, "
            f"expected {arch!r} fold {fold}"
        )
    return report


def read_final_report(path: Path, arch: str) -> dict:
    """The test report of ``arch``'s final model (evaluate_segmenter.py --fold all)."""
    report = read_json(path)
    if report.get("fold") != "all" or report.get("arch") != arch:
        raise InputError(
            f"{path}: holds arch {report.get('arch')!r} fold {report.get('fold')!r}, "
            f"expected {arch!r}'s final model (fold 'all')"
        )
    return report


def per_architecture(paths: list[Path], option: str, architectures: list[str], each: int):
    """``paths`` (architecture-major, ``each`` per architecture) as ``{arch: [paths]}``."""
    if len(paths) != len(architectures) * each:
        raise InputError(
            f"{option}: {len(paths)} files given, expected {each} for each of "
            f"{len(architectures)} architectures"
        )
    return {arch: paths[i * each : (i + 1) * each] for i, arch in enumerate(architectures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--architectures", nargs="+", required=True)
    parser.add_argument("--folds", required=True, type=int)
    files = {
        "val_metrics": "each fold's val_metrics.json (architecture-major)",
        "test_metrics": "each fold's test_metrics.json (architecture-major)",
        "fold_slices": "each fold's per_slice.csv (architecture-major)",
        "ensemble_metrics": "each architecture's ensemble/test_metrics.json",
        "ensemble_slices": "each architecture's ensemble/per_slice.csv",
        "ensemble_probabilities": "each architecture's ensemble/test_probabilities.npy",
    }
    for name, text in files.items():
        option = "--" + name.replace("_", "-")
        parser.add_argument(option, nargs="+", required=True, type=Path, help=text)
    parser.add_argument(
        "--final-metrics", nargs="*", default=[], type=Path,
        help="each architecture's final/test_metrics.json (segmentation.final_model), or none",
    )  # fmt: skip
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="data/lgg/images.npy")
    parser.add_argument("--masks", required=True, type=Path, help="data/lgg/masks.npy")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threshold", type=float, required=True, help="segmentation threshold")
    parser.add_argument("--summary", required=True, type=Path)
    parser.add_argument("--table1", required=True, type=Path)
    parser.add_argument("--table2", required=True, type=Path)
    parser.add_argument("--per-slice", required=True, type=Path)
    parser.add_argument("--overlays", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    archs = args.architectures
    per_fold = ("val_metrics", "test_metrics", "fold_slices")
    given = {
        name: per_architecture(
            getattr(args, name),
            "--" + name.replace("_", "-"),
            archs,
            args.folds if name in per_fold else 1,
        )
        for name in files
    }
    final = (
        per_architecture(args.final_metrics, "--final-metrics", archs, 1)
        if args.final_metrics
        else {}
    )
    folds = range(args.folds)
    summary: dict = {
        "architectures": {},
        "folds": args.folds,
        "threshold": args.threshold,
        "empty_mask_rules": EMPTY_MASK_RULES,
        "metric_scope": (
            "Tables: per-slice metrics on tumor-containing slices (as the paper), averaged over "
            "a fold's slices, then mean ± population std over the folds; 'all slices' and "
            "per-patient volume Dice beside. Fold ensemble: one model, means over test slices."
        ),
    }
    table1, table2, slices = [], [], []
    for arch in archs:
        val = [read_fold_report(given["val_metrics"][arch][k], arch, k) for k in folds]
        test = [read_fold_report(given["test_metrics"][arch][k], arch, k) for k in folds]
        ensemble = read_json(given["ensemble_metrics"][arch][0])
        summary["architectures"][arch] = {
            "validation": fold_summary(val),
            "test": fold_summary(test),
            "test_fold_ensemble": single_model_summary(ensemble),
            "per_fold": {
                split: {
                    "tumor_dice": [r["tumor_slices"]["dice"]["mean"] for r in reports],
                    "all_dice": [r["all_slices"]["dice"]["mean"] for r in reports],
                    "volume_dice": [r["volume_dice"]["mean"] for r in reports],
                }
                for split, reports in (("validation", val), ("test", test))
            },
        }
        table1.append(table_row(arch, summary["architectures"][arch]["validation"]))
        table2.append(table_row(arch, summary["architectures"][arch]["test"]))
        table2.append(ensemble_row(arch, ensemble))
        if final:
            report = read_final_report(final[arch][0], arch)
            summary["architectures"][arch]["test_final_model"] = single_model_summary(
                report, ("threshold", "epochs", "patients", "tta", "postprocess")
            )
            table2.append(ensemble_row(arch, report, "all-patients model"))
        for k in folds:
            frame = pd.read_csv(given["fold_slices"][arch][k], keep_default_na=False)
            slices.append(frame.assign(arch=arch, fold=k))

    # Overlays: the first architecture's ensemble picks the slices (failures and successes).
    rows = segmentation_rows(args.manifest, args.splits)
    first = archs[0]
    first_slices = given["ensemble_slices"][first][0]
    scored = pd.read_csv(first_slices, keep_default_na=False)
    if list(scored["id"]) != list(rows["id"]):
        raise InputError(f"{first_slices}: not the test slices")
    chosen = select_overlay_slices(scored, OVERLAY_ROWS, args.seed)
    summary["overlay_slices"] = [str(rows.loc[i, "id"]) for i in chosen]
    if chosen:
        picked = rows.loc[chosen]
        masks = load_masks(args.masks, picked)
        images = np.load(args.images, mmap_mode="r")
        shape = (len(rows), *masks.shape[1:])
        predictions = {
            arch: binarize(
                load_probabilities(given["ensemble_probabilities"][arch][0], shape)[chosen],
                args.threshold,
            )
            for arch in archs
        }
        titles = [
            f"{rows.loc[i, 'id']}\nDice {scored.loc[i, 'dice']:.2f} ({first})" for i in chosen
        ]
        figure = overlay_figure(
            np.asarray(images[picked["array_index"].to_numpy()]), masks, predictions, titles
        )
    else:
        figure = message_figure("no test slices")
    save_figure(figure, args.overlays)
    table1_frame = pd.DataFrame(table1, columns=TABLE_COLUMNS)
    table2_frame = pd.DataFrame(table2, columns=TABLE_COLUMNS)
    write_csv(args.table1, table1_frame, sep="\t")
    write_csv(args.table2, table2_frame, sep="\t")
    write_csv(args.per_slice, pd.concat(slices, ignore_index=True))
    write_json(args.summary, summary)
    log.info("Table 1 (validation):\n%s", table1_frame.to_string(index=False))
    log.info("Table 2 (test):\n%s", table2_frame.to_string(index=False))


if __name__ == "__main__":
    run_cli(main)
