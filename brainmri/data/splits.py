"""Reproducible, stratified train / validation / test splits and segmentation folds.

``level="patient"`` (default): LGG patients never cross the test set, the classification
validation set or the segmentation folds. The test patients are chosen per institution (in
proportion to the institutions' sizes) by a seeded search that keeps the test set's slice
fraction and tumor-slice ratio close to the whole. ``level="slice"`` is the paper's random
slice-level split, stratified by tumor presence, kept for comparison.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from brainmri.errors import ConfigError

log = logging.getLogger(__name__)

SEARCH_TRIES = 4000
MIN_VAL_PATIENTS = 2  # fewer: warn, the validation loss then follows one patient


def _quotas(counts: pd.Series, n_pick: int) -> dict[str, int]:
    """Largest-remainder allocation of ``n_pick`` over the groups in ``counts``."""
    exact = counts / counts.sum() * n_pick
    quotas = np.floor(exact).astype(int)
    remainder = (exact - quotas).sort_values(ascending=False, kind="stable")
    for key in remainder.index[: n_pick - int(quotas.sum())]:
        quotas[key] += 1
    return {str(k): int(v) for k, v in quotas.items()}


def pick_patients(
    patients: pd.DataFrame, fraction: float, rng: np.random.Generator, key: str
) -> list[str]:
    """Choose ``round(fraction * n)`` patients, stratified by institution, matching slice share
    and tumor ratio.

    ``patients``: index patient; columns institution, slices, tumor_slices. Each institution
    contributes its largest-remainder quota; among ``SEARCH_TRIES`` seeded draws the one with
    the smallest ``|slice share - fraction| + 0.5 |tumor ratio - overall tumor ratio|`` wins.
    """
    n_pick = round(fraction * len(patients))
    if n_pick < 1 or n_pick >= len(patients):
        raise ConfigError(
            f"{key}: {fraction} of {len(patients)} patients leaves an empty split ({n_pick} picked)"
        )
    quotas = _quotas(patients["institution"].value_counts().sort_index(), n_pick)
    names = np.asarray(patients.index, dtype=object)
    slices = patients["slices"].to_numpy(dtype=float)
    tumor = patients["tumor_slices"].to_numpy(dtype=float)
    institution = patients["institution"].to_numpy(dtype=object)
    groups = [(np.flatnonzero(institution == inst), quota) for inst, quota in quotas.items()]
    total_slices, tumor_ratio = slices.sum(), tumor.sum() / slices.sum()
    best, best_score = None, np.inf
    for _ in range(SEARCH_TRIES):
        chosen = np.concatenate(
            [rng.choice(members, size=quota, replace=False) for members, quota in groups if quota]
        )
        picked_slices = slices[chosen].sum()
        score = abs(picked_slices / total_slices - fraction) + 0.5 * abs(
            tumor[chosen].sum() / picked_slices - tumor_ratio
        )
        if score < best_score - 1e-12:
            best, best_score = chosen, score
    return sorted(names[best].tolist())


def patient_table(lgg: pd.DataFrame) -> pd.DataFrame:
    """One row per patient of LGG manifest rows: institution, slices, tumor slices (the input of
    :func:`pick_patients`)."""
    return lgg.groupby("patient").agg(
        institution=("institution", "first"),
        slices=("id", "size"),
        tumor_slices=("has_tumor", "sum"),
    )


def _btm_validation(btm: pd.DataFrame, fraction: float, rng: np.random.Generator) -> set[str]:
    """Validation ids of the second dataset: stratified by class, duplicate groups kept whole."""
    val: set[str] = set()
    for _, frame in btm.groupby("label", sort=True):
        groups = sorted(frame["duplicate_group"].unique())
        n_val = round(fraction * len(groups))
        chosen = set(rng.choice(groups, size=n_val, replace=False).tolist()) if n_val else set()
        val.update(btm.loc[btm["duplicate_group"].isin(chosen), "id"])
    return val


def make_splits(
    manifest: pd.DataFrame,
    level: str = "patient",
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    folds: int = 5,
    seed: int = 42,
    use_second_dataset: bool = True,
) -> pd.DataFrame:
    """Return ``id, cls_split, seg_split, fold`` for every manifest row (manifest order)."""
    rng = np.random.default_rng(seed)
    lgg = manifest[manifest["source"] == "lgg"]
    btm = manifest[manifest["source"] == "btm"]
    if lgg.empty:
        raise ConfigError("data: the manifest holds no LGG slices, nothing to split")
    splits = pd.DataFrame(
        {"id": manifest["id"], "cls_split": "unused", "seg_split": "unused", "fold": -1}
    ).set_index("id")

    if level == "patient":
        patients = patient_table(lgg)
        test_patients = set(pick_patients(patients, test_fraction, rng, "split.test_fraction"))
        is_test = lgg["patient"].isin(test_patients)
        train = lgg[~is_test]
        train_patients = patient_table(train)
        if folds > len(train_patients):
            raise ConfigError(
                f"split.folds: {folds} folds need at least {folds} training patients, "
                f"only {len(train_patients)} are left after the test split"
            )
        val_patients = set(pick_patients(train_patients, val_fraction, rng, "split.val_fraction"))
        if len(val_patients) < MIN_VAL_PATIENTS:
            log.warning(
                "split.val_fraction: %s of %d training patients puts only %d patient(s) in the "
                "classifiers' validation set: early stopping and the best checkpoint then follow "
                "one patient's slices; raise split.val_fraction (e.g. %.2f) for so few patients",
                val_fraction,
                len(train_patients),
                len(val_patients),
                min(0.5, MIN_VAL_PATIENTS / len(train_patients) + 0.01),
            )
        is_val = train["patient"].isin(val_patients)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        fold_iter = splitter.split(train, train["has_tumor"], groups=train["patient"])
    elif level == "slice":
        train_ids, _ = train_test_split(
            lgg["id"], test_size=test_fraction, stratify=lgg["has_tumor"], random_state=seed
        )
        is_test = ~lgg["id"].isin(set(train_ids))
        train = lgg[~is_test]
        if folds > len(train):
            raise ConfigError(f"split.folds: {folds} folds but only {len(train)} training slices")
        fit_ids, _ = train_test_split(
            train["id"], test_size=val_fraction, stratify=train["has_tumor"], random_state=seed
        )
        is_val = ~train["id"].isin(set(fit_ids))
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        fold_iter = splitter.split(train, train["has_tumor"])
    else:
        raise ConfigError(f"split.level: unknown level {level!r} (patient or slice)")

    splits.loc[lgg.loc[is_test, "id"], ["cls_split", "seg_split"]] = "test"
    splits.loc[train.loc[~is_val, "id"], "cls_split"] = "train"
    splits.loc[train.loc[is_val, "id"], "cls_split"] = "val"
    splits.loc[train["id"], "seg_split"] = "train"
    for fold, (_, val_index) in enumerate(fold_iter):
        splits.loc[train["id"].iloc[val_index], "fold"] = fold

    if use_second_dataset and not btm.empty:
        val_ids = _btm_validation(btm, val_fraction, rng)
        splits.loc[btm["id"], "cls_split"] = ["val" if i in val_ids else "train" for i in btm["id"]]

    result = splits.reset_index()
    result["fold"] = result["fold"].astype(int)
    for name, frame in (("cls", result["cls_split"]), ("seg", result["seg_split"])):
        for split in ("train", "test") + (("val",) if name == "cls" else ()):
            if not (frame == split).any():
                raise ConfigError(f"split: the {name} {split} split is empty")
    for fold in range(folds):
        if not (result["fold"] == fold).any():
            raise ConfigError(f"split.folds: fold {fold} is empty")
    return result


def split_summary(manifest: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """Counts per split (classification splits, segmentation folds), source and class."""
    table = manifest.merge(splits, on="id", validate="one_to_one")
    cls = table[table["cls_split"] != "unused"].assign(name=lambda t: t["cls_split"])
    seg = table[table["seg_split"] != "unused"]
    seg = seg.assign(
        name=np.where(seg["seg_split"] == "test", "test", "fold" + seg["fold"].astype(str))
    )
    rows = []
    for stage, frame in (("classification", cls), ("segmentation", seg)):
        for (name, source), part in frame.groupby(["name", "source"], sort=True):
            rows.append(
                {
                    "stage": stage,
                    "split": name,
                    "source": source,
                    "tumor": int(part["has_tumor"].sum()),
                    "no_tumor": int((part["has_tumor"] == 0).sum()),
                    "total": len(part),
                    "patients": part["patient"].nunique() if source == "lgg" else "",
                }
            )
    return pd.DataFrame(rows)
