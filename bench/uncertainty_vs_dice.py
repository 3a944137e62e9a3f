"""Is the fold models' disagreement high where the mask is wrong? Per slice of the test patients:
the Dice of the volume prediction's mask against the true mask, and the disagreement of the fold
models (brainmri.inference.uncertainty) -- inside the predicted tumor (slices.csv's column) and
where any fold sees tumor (the ensemble probability >= 0.1). Spearman correlations over the
slices that show tumor (true or predicted), with a bootstrap over patients, and the mean Dice by
disagreement tercile.

The segmentation is the volume prediction's (predict_volume), without the classifier gate (a
slice's decision is the segmenters' own), so that only the segmentation fold models count.

    python bench/uncertainty_vs_dice.py --splits results/uncertainty/splits/splits.csv \\
        --patients-root results/uncertainty/raw/lgg-mri-segmentation/kaggle_3m \\
        --segmenters results/uncertainty/segmentation/unet/fold*/model.pt --tta \\
        --postprocess '{"min_component_voxels": 4, "keep_largest": true}' \\
        --output results/uncertainty/uncertainty_vs_dice.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from brainmri.data.preprocess import open_image, to_uint8_gray
from brainmri.devices import select_device
from brainmri.evaluation.postprocess import PostProcess
from brainmri.inference.predict import array_size
from brainmri.inference.volume import EnsembleModels, predict_volume
from brainmri.inference.volume_io import read_kaggle_folder
from brainmri.io import setup_logging


class FoldsOnly:
    """The segmentation fold models of EnsembleModels, every slice let through the gate."""

    segment_folds = EnsembleModels.segment_folds

    def __init__(self, segmenters, device, tta):
        self.segmenters, self.device, self.tta = segmenters, device, tta

    def classify(self, images):
        ones = np.ones(len(images), dtype=int)
        return ones, ones.astype(float), ones


BINS = [0, 0.05, 0.1, 0.2, 0.3, 0.51]  # std bins of the voxel-level table
VOXELS: list[pd.DataFrame] = []  # per patient and bin: voxels, wrong voxels


def slice_table(folder: Path, models, size: int, post: PostProcess) -> pd.DataFrame:
    volume = read_kaggle_folder(folder)
    result = predict_volume(volume, models, size, 0.5, post)
    truth = np.stack(
        [
            to_uint8_gray(open_image(p.with_name(f"{p.name.rsplit('.', 1)[0]}_mask.tif"))) > 127
            for p in volume.slice_files
        ]
    )
    pred = result.mask
    spread = result.folds.disagreement.astype(float) / 255
    seen = result.folds.probability >= 26  # ensemble probability >= 0.1
    region = pred | truth | (spread > 0.02)  # voxels any model or the truth calls tumor
    bins = np.digitize(spread[region], BINS[1:-1])
    wrong = (pred != truth)[region]
    VOXELS.append(
        pd.DataFrame(
            {
                "patient": volume.name,
                "bin": np.arange(len(BINS) - 1),
                "voxels": np.bincount(bins, minlength=len(BINS) - 1),
                "wrong": np.bincount(bins, weights=wrong, minlength=len(BINS) - 1).astype(int),
            }
        )
    )
    inter = (pred & truth).reshape(len(pred), -1).sum(1)
    sizes = pred.reshape(len(pred), -1).sum(1) + truth.reshape(len(pred), -1).sum(1)
    seen_count = seen.reshape(len(pred), -1).sum(1)
    return pd.DataFrame(
        {
            "patient": volume.name,
            "slice": volume.slice_numbers,
            "true_voxels": truth.reshape(len(pred), -1).sum(1),
            "pred_voxels": pred.reshape(len(pred), -1).sum(1),
            "dice": np.where(sizes > 0, 2 * inter / np.maximum(sizes, 1), np.nan),
            "disagreement_in_tumor": result.per_slice["disagreement"].to_numpy(),
            "disagreement_where_seen": np.where(
                seen_count > 0,
                (spread * seen).reshape(len(pred), -1).sum(1) / np.maximum(seen_count, 1),
                0.0,
            ),
        }
    )


def bootstrap(table: pd.DataFrame, column: str, rounds: int, seed: int = 0) -> tuple:
    """Spearman rho of ``column`` vs Dice, and its 95 % interval over patients resampled."""
    rng = np.random.default_rng(seed)
    groups = [g for _, g in table.groupby("patient")]
    rho = spearmanr(table[column], table["dice"]).statistic
    draws = []
    for _ in range(rounds):
        sample = pd.concat([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        if sample[column].nunique() > 1 and sample["dice"].nunique() > 1:
            draws.append(spearmanr(sample[column], sample["dice"]).statistic)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return rho, low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--patients-root", type=Path, required=True)
    parser.add_argument("--segmenters", nargs="+", type=Path, required=True)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--postprocess", default="{}")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    log = setup_logging()
    splits = pd.read_csv(args.splits)
    test = sorted({i.rsplit("_", 1)[0] for i in splits.loc[splits["seg_split"] == "test", "id"]})
    models = FoldsOnly(args.segmenters, select_device(log), args.tta)
    size = array_size(args.segmenters)
    post = PostProcess.from_settings(json.loads(args.postprocess))
    table = pd.concat(
        [slice_table(args.patients_root / p, models, size, post) for p in test], ignore_index=True
    )
    tumor = table[table["dice"].notna()].copy()
    lines = [
        f"Test patients: {len(test)} ({', '.join(test)}); {len(table)} slices, {len(tumor)} with "
        f"tumor (true or predicted); {len(args.segmenters)} fold models.",
        "",
        "| disagreement, slices | Spearman rho with slice Dice | 95 % CI (bootstrap over "
        "patients) | rho within each patient |",
        "| --- | --- | --- | --- |",
    ]
    predicted = tumor[tumor["pred_voxels"] > 0]
    for name, subset in (("tumor slices", tumor), ("slices with predicted tumor", predicted)):
        for column in ("disagreement_in_tumor", "disagreement_where_seen"):
            rho, low, high = bootstrap(subset, column, args.rounds)
            within = ", ".join(
                f"{p[-13:]}: {spearmanr(g[column], g['dice']).statistic:.2f}"
                for p, g in subset.groupby("patient")
            )
            lines.append(
                f"| {column}, {name} ({len(subset)}) | {rho:.3f} | {low:.3f} to {high:.3f} | "
                f"{within} |"
            )
    tumor["tercile"] = pd.qcut(
        tumor["disagreement_where_seen"].rank(method="first"), 3, labels=["low", "mid", "high"]
    )
    by = tumor.groupby("tercile", observed=True).agg(
        slices=("dice", "size"),
        disagreement=("disagreement_where_seen", "mean"),
        mean_dice=("dice", "mean"),
        missed=("pred_voxels", lambda v: int((v == 0).sum())),
    )
    lines += [
        "",
        "| disagreement_where_seen tercile | slices | mean disagreement | mean Dice | "
        "slices with no predicted tumor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in by.iterrows():
        lines.append(
            f"| {name} | {row['slices']} | {row['disagreement']:.3f} | {row['mean_dice']:.3f} | "
            f"{row['missed']} |"
        )
    voxels = pd.concat(VOXELS).groupby("bin")[["voxels", "wrong"]].sum()
    lines += [
        "",
        "| voxel disagreement (std) | voxels | wrong (mask differs from the truth) |",
        "| --- | --- | --- |",
    ]
    for b, row in voxels.iterrows():
        share = row["wrong"] / row["voxels"] if row["voxels"] else float("nan")
        lines.append(f"| {BINS[b]:.2f} to {BINS[b + 1]:.2f} | {row['voxels']} | {share:.3f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    table.to_csv(args.output.with_suffix(".csv"), index=False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
