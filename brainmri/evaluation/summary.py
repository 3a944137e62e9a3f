"""Summaries over folds: mean ± std, the rows of the paper's Tables 1 and 2, overlay picks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from brainmri.evaluation.segmentation import CASES, SEGMENTATION_METRICS


def mean_std(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and (population) std over folds, ignoring missing values."""
    clean = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(clean):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(clean.mean()), "std": float(clean.std()), "n": len(clean)}


def fold_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over folds of each fold's mean, on tumor slices, all slices, and volumes;
    empty-case counts summed over the folds."""
    summary: dict[str, Any] = {}
    for scope in ("tumor_slices", "all_slices"):
        summary[scope] = {
            m: mean_std([r[scope][m]["mean"] for r in reports]) for m in SEGMENTATION_METRICS
        }
        summary[scope]["cases"] = {
            case: int(sum(r[scope]["cases"][case] for r in reports)) for case in CASES
        }
        summary[scope]["n_slices"] = int(sum(r[scope]["n_slices"] for r in reports))
    summary["volume_dice"] = mean_std([r["volume_dice"]["mean"] for r in reports])
    return summary


def _pm(value: dict[str, Any]) -> str:
    if value.get("mean") is None:
        return ""
    if value.get("std") is None:
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


TABLE_COLUMNS = [
    "model",
    "dice",
    "jaccard",
    "hd (px)",
    "assd (px)",
    "dice (all slices)",
    "volume dice",
]


def table_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A row of Tables 1/2: mean ± std over folds (tumor slices), all-slice and volume Dice."""
    tumor = summary["tumor_slices"]
    return {
        "model": name,
        "dice": _pm(tumor["dice"]),
        "jaccard": _pm(tumor["jaccard"]),
        "hd (px)": _pm(tumor["hd"]),
        "assd (px)": _pm(tumor["assd"]),
        "dice (all slices)": _pm(summary["all_slices"]["dice"]),
        "volume dice": _pm(summary["volume_dice"]),
    }


def ensemble_row(name: str, report: dict[str, Any], label: str = "fold ensemble") -> dict[str, Any]:
    """Table 2's row of one model (means over the test slices, no ± std): the fold ensemble,
    or with ``label`` "all-patients model" the final model trained on every fold."""
    single = {
        "tumor_slices": {
            m: {"mean": report["tumor_slices"][m]["mean"]} for m in SEGMENTATION_METRICS
        },
        "all_slices": {"dice": {"mean": report["all_slices"]["dice"]["mean"]}},
        "volume_dice": {"mean": report["volume_dice"]["mean"]},
    }
    return table_row(f"{name} ({label})", single)


def single_model_summary(
    report: dict[str, Any], extra: tuple[str, ...] = ("models", "threshold")
) -> dict[str, Any]:
    """summary.json's entry of one model scored on the test set (fold ensemble, final model):
    its metrics and the ``extra`` keys of its report (None where absent)."""
    return {
        "tumor_slices": report["tumor_slices"],
        "all_slices": report["all_slices"],
        "volume_dice": {k: report["volume_dice"][k] for k in ("mean", "std")},
    } | {key: report.get(key) for key in extra}


def select_overlay_slices(
    frame: pd.DataFrame, count: int, seed: int, extremes: int = 2
) -> list[int]:
    """Positions of ``count`` slices for the overlay figure: the ``extremes`` lowest-Dice
    tumor slices (failures), the ``extremes`` highest (successes), then a seeded random draw
    of the other tumor slices; in that order. Falls back to all slices without tumors."""
    pool = frame.reset_index(drop=True)
    tumor = pool[pool["has_tumor"] == 1]
    if tumor.empty:
        tumor = pool
    ranked = tumor.sort_values(["dice", "id"], kind="stable").index.tolist()
    worst = ranked[: min(extremes, count)]
    best = [i for i in reversed(ranked) if i not in worst][
        : max(0, min(extremes, count - len(worst)))
    ]
    rest = [i for i in ranked if i not in worst and i not in best]
    need = max(0, min(len(rest), count - len(worst) - len(best)))
    drawn = np.random.default_rng(seed).choice(rest, size=need, replace=False) if need else []
    return worst + best + sorted(int(i) for i in drawn)
