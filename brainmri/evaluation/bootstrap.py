"""Bootstrap confidence intervals over patients (percentile method, seeded).

Patients, not slices, are the independent units: a per-patient statistic is resampled over
patients (:func:`bootstrap_ci`, :func:`paired_difference`), and a pooled slice statistic
(accuracy, F1, AUC of all slices together) by drawing whole patients with their slices
(:func:`grouped_bootstrap`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

N_BOOT = 10_000
LEVEL = 0.95


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile CI of ``statistic`` of ``values`` (one per patient; NaNs dropped)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(n_boot, len(values)))
    samples = values[picks]
    if statistic is np.mean:
        draws = samples.mean(axis=1)
    elif statistic is np.median:
        draws = np.median(samples, axis=1)
    else:
        draws = np.array([statistic(row) for row in samples])
    return _interval(draws, level)


def paired_difference(
    variant: pd.Series,
    reference: pd.Series,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Per-patient ``variant - reference`` (aligned on the index, pairs with a NaN dropped):
    n, mean, median, the bootstrap CI of the mean and whether it excludes zero."""
    joined = pd.concat([variant.rename("v"), reference.rename("r")], axis=1, join="inner")
    joined = joined.dropna()
    diffs = (joined["v"] - joined["r"]).to_numpy(dtype=np.float64)
    low, high = bootstrap_ci(diffs, np.mean, n_boot, seed, level)
    return {
        "n": len(diffs),
        "mean": float(diffs.mean()) if len(diffs) else float("nan"),
        "median": float(np.median(diffs)) if len(diffs) else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "excludes_zero": bool(low > 0 or high < 0),
    }


def grouped_bootstrap(
    groups: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 2_000,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile CI of a pooled statistic: each draw takes as many patients as there are,
    with replacement, with all their items; ``statistic`` gets the items' positions (with
    repeats) and returns a number (NaN where undefined, e.g. AUC of one class)."""
    groups = np.asarray(groups)
    names = pd.unique(groups)
    members = [np.flatnonzero(groups == name) for name in names]
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        chosen = rng.integers(0, len(names), size=len(names))
        draws[b] = statistic(np.concatenate([members[i] for i in chosen]))
    return _interval(draws, level)
