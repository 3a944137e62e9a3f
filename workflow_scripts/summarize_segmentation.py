"""The paper's Table 1 (validation, mean ± std over folds) and Table 2 (test, mean ± std over
the fold models, plus the fold ensemble), summary.json, all per-slice rows, and overlays."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.data import load_table
from brainmri.io import read_json, run_cli, setup_logging, write_csv, write_json
from brainmri.metrics import mean_std
from brainmri.plotting import overlay_figure, save_figure

METRICS = ("dice", "jaccard", "hd", "assd")
OVERLAY_ROWS = 6


def fold_summary(reports: list[dict]) -> dict:
    """Mean ± std over folds of each fold's mean, on tumor slices, all slices, and volumes."""
    summary = {}
    for scope in ("tumor_slices", "all_slices"):
        summary[scope] = {m: mean_std([r[scope][m]["mean"] for r in reports]) for m in METRICS}
        summary[scope]["cases"] = {
            case: int(sum(r[scope]["cases"][case] for r in reports))
            for case in reports[0][scope]["cases"]
        }
    summary["volume_dice"] = mean_std([r["volume_dice"]["mean"] for r in reports])
    return summary


def table_row(name: str, summary: dict) -> dict:
    row = {"model": name}
    for metric in METRICS:
        value = summary["tumor_slices"][metric]
        row[metric] = (
            f"{value['mean']:.3f} ± {value['std']:.3f}" if value["mean"] is not None else ""
        )
    dice_all = summary["all_slices"]["dice"]
    row["dice (all slices)"] = f"{dice_all['mean']:.3f} ± {dice_all['std']:.3f}"
    volume = summary["volume_dice"]
    row["volume dice"] = (
        f"{volume['mean']:.3f} ± {volume['std']:.3f}" if volume["mean"] is not None else ""
    )
    return row


def ensemble_row(name: str, report: dict) -> dict:
    row = {"model": f"{name} (fold ensemble)"}
    for metric in METRICS:
        row[metric] = f"{report['tumor_slices'][metric]['mean']:.3f}"
    row["dice (all slices)"] = f"{report['all_slices']['dice']['mean']:.3f}"
    row["volume dice"] = f"{report['volume_dice']['mean']:.3f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results-dir", required=True, type=Path)
    parser.add_argument("--architectures", nargs="+", required=True)
    parser.add_argument("--folds", required=True, type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--summary", required=True, type=Path)
    parser.add_argument("--table1", required=True, type=Path)
    parser.add_argument("--table2", required=True, type=Path)
    parser.add_argument("--per-slice", required=True, type=Path)
    parser.add_argument("--overlays", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    root = args.results_dir / "segmentation"
    summary: dict = {"architectures": {}}
    table1, table2, slices = [], [], []
    for arch in args.architectures:
        val = [read_json(root / arch / f"fold{k}" / "val_metrics.json") for k in range(args.folds)]
        test = [
            read_json(root / arch / f"fold{k}" / "test_metrics.json") for k in range(args.folds)
        ]
        ensemble = read_json(root / arch / "ensemble" / "test_metrics.json")
        summary["architectures"][arch] = {
            "validation": fold_summary(val),
            "test": fold_summary(test),
            "test_fold_ensemble": {k: ensemble[k] for k in ("tumor_slices", "all_slices")}
            | {
                "volume_dice": {
                    "mean": ensemble["volume_dice"]["mean"],
                    "std": ensemble["volume_dice"]["std"],
                }
            },
            "folds": args.folds,
        }
        table1.append(table_row(arch, summary["architectures"][arch]["validation"]))
        table2.append(table_row(arch, summary["architectures"][arch]["test"]))
        table2.append(ensemble_row(arch, ensemble))
        for k in range(args.folds):
            frame = pd.read_csv(root / arch / f"fold{k}" / "per_slice.csv")
            slices.append(frame.assign(arch=arch, fold=k))
    summary["empty_mask_rules"] = val[0]["empty_mask_rules"]
    summary["metric_scope"] = (
        "Tables: per-slice metrics on tumor-containing slices (as the paper), mean over a fold's "
        "slices, then mean ± std over the folds; 'all slices' and per-patient volume Dice beside."
    )

    # Overlays: a seeded selection of test tumor slices, the worst and a random few.
    table = load_table(
        args.results_dir / "data" / "manifest.csv", args.results_dir / "splits" / "splits.csv"
    )
    test_rows = table[table["seg_split"] == "test"].reset_index(drop=True)
    first = args.architectures[0]
    ensemble_slices = pd.read_csv(root / first / "ensemble" / "per_slice.csv")
    tumor = ensemble_slices.index[ensemble_slices["has_tumor"] == 1].to_numpy()
    rng = np.random.default_rng(args.seed)
    worst = ensemble_slices.loc[tumor].sort_values("dice").index[:2].tolist()
    rest = [i for i in tumor if i not in worst]
    chosen = worst + sorted(
        rng.choice(rest, size=min(len(rest), OVERLAY_ROWS - len(worst)), replace=False).tolist()
    )
    if chosen:
        images = np.load(args.results_dir / "data" / "lgg" / "images.npy", mmap_mode="r")
        masks = np.load(args.results_dir / "data" / "lgg" / "masks.npy", mmap_mode="r")
        index = test_rows.loc[chosen, "array_index"].to_numpy()
        predictions = {
            arch: np.load(root / arch / "ensemble" / "test_probabilities.npy")[chosen] >= 128
            for arch in args.architectures
        }
        titles = [
            f"{test_rows.loc[i, 'id']}\nDice {ensemble_slices.loc[i, 'dice']:.2f} ({first})"
            for i in chosen
        ]
        figure = overlay_figure(images[index], masks[index], predictions, titles)
    else:
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=(4, 1))
        figure.text(0.5, 0.5, "no tumor slices in the test set", ha="center")
    save_figure(figure, args.overlays)
    write_csv(args.table1, pd.DataFrame(table1), sep="\t")
    write_csv(args.table2, pd.DataFrame(table2), sep="\t")
    write_csv(args.per_slice, pd.concat(slices, ignore_index=True))
    write_json(args.summary, summary)
    log.info("Table 1 (validation):\n%s", pd.DataFrame(table1).to_string(index=False))
    log.info("Table 2 (test):\n%s", pd.DataFrame(table2).to_string(index=False))


if __name__ == "__main__":
    run_cli(main)
