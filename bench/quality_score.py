"""Scoring and tables of the quality benchmark (bench/quality.py): per-patient segmentation
metrics, the segmentation-derived and classifier tumor detectors, paired bootstrap CIs against
the reference variant, markdown."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from brainmri.evaluation.bootstrap import bootstrap_ci, grouped_bootstrap, paired_difference
from brainmri.evaluation.masks import binarize
from brainmri.evaluation.patients import patient_metrics
from brainmri.evaluation.postprocess import PostProcess, clean_patients
from brainmri.evaluation.voting import choose_min_pixels

SEG_COLUMNS = {
    "dice_tumor_slices": "tumor-slice Dice",
    "volume_dice": "volume Dice",
    "buda_volume_dice": "Buda volume Dice",
}


def masks_of(stored: np.ndarray, rows: pd.DataFrame, inference: dict[str, Any]) -> np.ndarray:
    """Thresholded, per-patient post-processed masks of uint8 stored probabilities."""
    pred = binarize(stored, float(inference["threshold"]))
    return clean_patients(pred, rows, PostProcess.from_settings(inference.get("postprocess")))


def segmentation_patients(
    rows: pd.DataFrame, stored: np.ndarray, truth: np.ndarray, inference: dict[str, Any]
) -> pd.DataFrame:
    """:func:`brainmri.evaluation.patients.patient_metrics` of one variant's predictions."""
    return patient_metrics(masks_of(stored, rows, inference), truth, rows)


def detector(
    val_rows: pd.DataFrame,
    val_stored: np.ndarray,
    test_rows: pd.DataFrame,
    test_stored: np.ndarray,
    inference: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, int]:
    """The segmentation-derived detector of one fold: ``k`` chosen on the inner validation
    slices (best accuracy), then test decisions (mask >= k pixels) and mask areas."""
    val_areas = masks_of(val_stored, val_rows, inference).reshape(len(val_rows), -1).sum(1)
    k, _ = choose_min_pixels(val_areas, val_rows["has_tumor"].to_numpy())
    areas = masks_of(test_stored, test_rows, inference).reshape(len(test_rows), -1).sum(1)
    return (areas >= k).astype(int), areas, k


def _f1(labels: np.ndarray, preds: np.ndarray) -> float:
    tp = int((labels & preds).sum())
    positives = int(labels.sum()) + int(preds.sum())
    return float("nan") if positives == 0 else 2 * tp / positives


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half; equals scikit-learn's), NaN
    with one class; vectorised, as the bootstrap calls it thousands of times."""
    from scipy.stats import rankdata

    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def area_quartiles(areas: np.ndarray) -> np.ndarray:
    """Quartile (1-4) of each tumor slice's true area among all tumor slices; 0: no tumor."""
    areas = np.asarray(areas)
    tumor = areas > 0
    edges = np.quantile(areas[tumor], [0.25, 0.5, 0.75]) if tumor.any() else []
    quartile = np.zeros(len(areas), dtype=int)
    quartile[tumor] = 1 + np.searchsorted(edges, areas[tumor], side="right")
    return np.minimum(quartile, 4)


def classification_summary(slices: pd.DataFrame, n_boot: int = 2_000) -> dict[str, Any]:
    """Pooled accuracy, tumor F1, AUC, per-patient accuracy and sensitivity by tumor-area
    quartile of ``slices`` (patient, label, pred, score, quartile), CIs over patients."""
    labels = slices["label"].to_numpy(dtype=bool)
    preds = slices["pred"].to_numpy(dtype=bool)
    scores = slices["score"].to_numpy(dtype=float)
    groups = slices["patient"].to_numpy()
    quartile = slices["quartile"].to_numpy()
    statistics = {
        "accuracy": lambda i: float((labels[i] == preds[i]).mean()),
        "tumor_f1": lambda i: _f1(labels[i], preds[i]),
        "auc": lambda i: _auc(labels[i], scores[i]),
    }
    for q in (1, 2, 3, 4):
        statistics[f"sensitivity_q{q}"] = lambda i, q=q: (
            float(preds[i][quartile[i] == q].mean()) if (quartile[i] == q).any() else np.nan
        )
    everything = np.arange(len(slices))
    summary: dict[str, Any] = {}
    for name, statistic in statistics.items():
        low, high = grouped_bootstrap(groups, statistic, n_boot)
        summary[name] = {"value": statistic(everything), "ci_low": low, "ci_high": high}
    per_patient = slices.assign(ok=labels == preds).groupby("patient")["ok"].mean()
    low, high = bootstrap_ci(per_patient.to_numpy(), n_boot=n_boot)
    summary["patient_accuracy"] = {
        "value": float(per_patient.mean()),
        "ci_low": low,
        "ci_high": high,
    }
    return summary


def pooled_difference(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 2_000) -> dict[str, Any]:
    """Pooled accuracy of detector ``a`` minus ``b`` (same slices, same order), CI over
    patients (paired: each draw takes the same patients for both)."""
    ok_a = (a["label"] == a["pred"]).to_numpy(dtype=float)
    ok_b = (b["label"] == b["pred"]).to_numpy(dtype=float)
    diff = ok_a - ok_b
    low, high = grouped_bootstrap(a["patient"].to_numpy(), lambda i: float(diff[i].mean()), n_boot)
    return {
        "mean": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
        "excludes_zero": bool(low > 0 or high < 0),
    }


# --- tables ----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(d: dict[str, Any]) -> str:
    star = " **\\***" if d.get("excludes_zero") else ""
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{star}"


def segmentation_table(patients: pd.DataFrame, info: dict[str, dict[str, Any]]) -> str:
    """One row per variant (condition ``original``): means and medians over patients, HD95,
    slice sensitivity, the two sequence groups, the FLAIR-only condition, CPU seconds."""
    lines = [
        "| variant | n | tumor-slice Dice mean / median | volume Dice mean / median | "
        "Buda volume Dice mean / median | HD95 px | tumor slices missed | "
        "volume Dice all seq. / missing seq. | FLAIR-only volume Dice (all) | "
        "train CPU s per fold |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in patients["variant"].unique():
        own = patients[patients["variant"] == name]
        o = own[own["condition"] == "original"]
        f = own[own["condition"] == "flair_only"]
        missing = o["missing_modalities"].astype(str) != ""
        cells = [name, str(len(o))]
        for column in SEG_COLUMNS:
            cells.append(f"{o[column].mean():.3f} / {o[column].median():.3f}")
        missed = int(o["missed_tumor_slices"].sum())
        cells += [
            _fmt(float(o["hd95"].mean()), 1),
            f"{missed} / {int(o['tumor_slices'].sum())}",
            f"{o.loc[~missing, 'volume_dice'].mean():.3f} / "
            f"{_fmt(float(o.loc[missing, 'volume_dice'].mean()))} ({int(missing.sum())})",
            _fmt(float(f["volume_dice"].mean())) if len(f) else "n/a",
            _fmt(info.get(name, {}).get("seconds_per_fold"), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(
    patients: pd.DataFrame, reference: str, condition: str, n_boot: int = 10_000
) -> str:
    """Paired per-patient differences (variant - reference) with bootstrap 95 % CIs."""
    lines = [
        f"| variant - {reference} ({condition}) | "
        + " | ".join(f"{label} mean [95 % CI]" for label in SEG_COLUMNS.values())
        + " | median volume Dice diff. |",
        "| --- |" + " ---: |" * (len(SEG_COLUMNS) + 1),
    ]
    chosen = patients[patients["condition"] == condition]
    ref = chosen[chosen["variant"] == reference].set_index("patient")
    if ref.empty:
        return ""
    for name in chosen["variant"].unique():
        if name == reference:
            continue
        own = chosen[chosen["variant"] == name].set_index("patient")
        diffs = {c: paired_difference(own[c], ref[c], n_boot) for c in SEG_COLUMNS}
        cells = [name] + [_ci(d) for d in diffs.values()]
        cells.append(f"{diffs['volume_dice']['median']:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def classification_table(
    summaries: dict[str, dict[str, Any]],
    diffs: dict[str, Any],
    extra: dict[str, dict[str, str]] | None = None,
) -> str:
    """One row per detector: pooled metrics with CIs over patients; ``extra``: more columns
    (``{header: {detector: cell}}``, "—" where a detector has none)."""
    names = ["accuracy", "tumor_f1", "auc", "patient_accuracy"] + [
        f"sensitivity_q{q}" for q in (1, 2, 3, 4)
    ]
    lines = [
        "| detector | accuracy | tumor F1 | AUC | per-patient accuracy | sensitivity by tumor "
        "area quartile (Q1 small … Q4) | accuracy − reference [95 % CI] |"
        + "".join(f" {header} |" for header in extra or {}),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(extra or {}),
    ]
    for name, summary in summaries.items():
        cell = lambda key, s=summary: (  # noqa: E731
            f"{_fmt(s[key]['value'])} [{_fmt(s[key]['ci_low'])}, {_fmt(s[key]['ci_high'])}]"
        )
        quartiles = " / ".join(_fmt(summary[f"sensitivity_q{q}"]["value"], 2) for q in range(1, 5))
        diff = diffs.get(name)
        cells = [name, *[cell(k) for k in names[:4]], quartiles, _ci(diff) if diff else "—"]
        cells += [column.get(name, "—") for column in (extra or {}).values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
