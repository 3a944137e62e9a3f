"""The fold ensemble in the quality benchmark (bench/quality.py): a variant with ``members: N``
trains, inside each outer fold, N member models as the workflow trains its fold models, and
scores the mean of their probabilities (the workflow's fold ensemble) on the outer test
patients.

The outer fold's training patients (its train and inner validation patients together) are split
into N inner folds by patient (``StratifiedGroupKFold`` grouped by patient, stratified by tumor
slices, as ``make_splits`` makes the workflow's folds); member m trains on the other N-1 inner
folds, chooses its checkpoint on inner fold m and has the budget of one fold model. The members
also appear as variants of their own, ``<variant>/m<m>`` (member m of every outer fold), so the
report compares the ensemble with its best member.

Cache: ``models/<variant>/fold<k>/m<m>/`` (a member), ``models/<variant>/fold<k>/info.json``
(written when all members of the fold are done), ``probs/<variant>-tta<t>/fold<k>-m<m>-<part>.npy``
(a member) and ``fold<k>-<part>.npy`` (the ensemble; ``val``: the out-of-fold predictions of the
fold's training patients, each by the member that did not train on it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bench import quality_cv as cv
from bench.quality_score import SEG_COLUMNS, _ci
from brainmri.errors import InputError
from brainmri.evaluation.bootstrap import paired_difference
from brainmri.evaluation.masks import mean_probabilities

KEY = "members"


@dataclass(frozen=True)
class Member:
    """Member ``number`` of an outer fold's ensemble: it trains on ``train`` and its checkpoint
    is chosen on ``val`` (both among the outer fold's training patients)."""

    number: int
    train: tuple[str, ...]
    val: tuple[str, ...]


def members_plan(rows: pd.DataFrame, fold: cv.Fold, members: int, seed: int) -> list[Member]:
    """The members of outer fold ``fold``: its training patients (``train`` + ``val``) in
    ``members`` inner folds (patient-level ``StratifiedGroupKFold``, seeded); the outer test
    patients are in no member's train or val."""
    patients = sorted(fold.train + fold.val)
    if not 2 <= members <= len(patients):
        raise InputError(
            f"members {members}: outer fold {fold.number} has {len(patients)} training "
            "patients, members must lie between 2 and that"
        )
    training = cv.of(rows, tuple(patients))
    splitter = StratifiedGroupKFold(n_splits=members, shuffle=True, random_state=seed)
    plan = []
    split = splitter.split(training, training["has_tumor"], groups=training["patient"])
    for number, (_, inner) in enumerate(split):
        val = sorted(set(training["patient"].iloc[inner]))
        train = sorted(set(patients) - set(val))
        if not val or not train:
            raise InputError(f"members {members}: member {number} of fold {fold.number} is empty")
        plan.append(Member(number, tuple(train), tuple(val)))
    return plan


def members_table(plan: list[cv.Fold], rows: pd.DataFrame, members: int, seed: int):
    """patient, fold, member, role (train / val) of every member of every outer fold."""
    return pd.DataFrame(
        [
            {"patient": p, "fold": fold.number, "member": m.number, "role": role}
            for fold in plan
            for m in members_plan(rows, fold, members, seed)
            for role in ("train", "val")
            for p in getattr(m, role)
        ]
    )


def write_plans(bench) -> None:
    """``<work>/members<N>_plan.csv`` (:func:`members_table`) for each ensemble size N."""
    from brainmri.io import write_csv

    for n in sorted({size(bench.variants, name) for name in bench.variants} - {0}):
        table = members_table(bench.plan, bench.rows, n, bench.args.seed)
        write_csv(bench.work / f"members{n}_plan.csv", table)


# --- variants --------------------------------------------------------------------------------


def check_variants(path: Path, variants: dict[str, dict[str, Any]]) -> None:
    """``members`` only on recipe variants, an integer of at least 2; member names free."""
    for name, variant in variants.items():
        if KEY not in variant:
            continue
        value = variant[KEY]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise InputError(
                f"{path}: variant {name}: members must be an integer >= 2, not {value!r}"
            )
        kind = variant.get("kind", "recipe")
        if kind != "recipe":
            raise InputError(f"{path}: variant {name}: members needs kind recipe, not {kind}")
    for name in variants:
        if size(variants, name):
            taken = [member_name(name, m) for m in range(size(variants, name))]
            clash = sorted(set(taken) & set(variants))
            if clash:
                raise InputError(f"{path}: variant {name}: {clash} are its members' names")


def size(variants: dict[str, dict[str, Any]], name: str) -> int:
    """Members of a variant's models (its ``models_from`` variant's); 0: a single model."""
    owner = variants[name].get("models_from") or name
    return int(variants.get(owner, {}).get(KEY, 0))


def member_name(name: str, member: int) -> str:
    return f"{name}/m{member}"


def expand(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The variants with, after each ensemble, its members as variants ``<name>/m<m>``: the
    ensemble's models_from (or the ensemble) and inference keys, and ``member: m``."""
    out: dict[str, dict[str, Any]] = {}
    for name, variant in variants.items():
        out[name] = variant
        owner = variant.get("models_from") or name
        for m in range(size(variants, name)):
            inference = {
                k: v for k, v in variant.items() if k in ("tta", "postprocess", "threshold")
            }
            note = f"member {m} of {name}"
            out[member_name(name, m)] = {
                **inference,
                "models_from": owner,
                "member": m,
                "member_of": name,
                "note": note,
            }
    return out


def is_ensemble(bench, name: str) -> bool:
    return size(bench.variants, name) > 0 and "member" not in bench.variants[name]


def member_of(bench, name: str, fold: cv.Fold) -> Member:
    variant = bench.variants[name]
    owner = variant["models_from"]
    plan = members_plan(bench.rows, fold, size(bench.variants, owner), bench.args.seed)
    return plan[variant["member"]]


def val_patients(bench, name: str, fold: cv.Fold) -> tuple[str, ...]:
    """Where a variant's checkpoint (and detector k) is chosen: the inner validation patients,
    a member's inner fold, or (the ensemble) all the outer fold's training patients, out of
    fold."""
    if "member" in bench.variants[name]:
        return member_of(bench, name, fold).val
    if is_ensemble(bench, name):
        return tuple(sorted(fold.train + fold.val))
    return fold.val


def probs_stem(bench, name: str, fold: cv.Fold, part: str) -> str:
    member = bench.variants[name].get("member")
    return f"fold{fold.number}-{part}" if member is None else f"fold{fold.number}-m{member}-{part}"


# --- training and probabilities --------------------------------------------------------------


def train(bench, name: str, fold: cv.Fold) -> dict[str, Any]:
    """Train (or find) a member, or all members of an ensemble's fold; info.json."""
    if is_ensemble(bench, name):
        infos = [
            train(bench, member_name(name, m), fold) for m in range(size(bench.variants, name))
        ]
        info_path = bench.model_dir(name, fold) / "info.json"
        info = {
            "fold": fold.number,
            "kind": "recipe",
            "members": len(infos),
            "seconds": round(sum(i["seconds"] for i in infos), 1),
            "epochs_run": [i["epochs_run"] for i in infos],
            "best_epoch": [i["best_epoch"] for i in infos],
            "stopped_by": "+".join(sorted({i["stopped_by"] for i in infos})),
            "clock": bench.args.clock,
            "budget": bench.budget(name),
        }
        if not info_path.is_file():
            cv.write_info(info_path, info)
        return info
    folder = bench.model_dir(name, fold)
    info_path = folder / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    member = member_of(bench, name, fold)
    info = bench.train_recipe(name, fold, member.train, member.val, folder)  # a fold model's seed
    info.update(fold=fold.number, member=member.number, kind="recipe", clock=bench.args.clock,
                budget=bench.budget(name))  # fmt: skip
    cv.write_info(info_path, info)
    return info


def ensemble_probabilities(bench, name: str, fold: cv.Fold, part: str) -> np.ndarray:
    """The fold ensemble's stored probabilities: ``test`` / ``flair`` the workflow's
    :func:`brainmri.evaluation.masks.mean_probabilities` of the members'; ``val`` each
    training patient's slices by the member that held it out (rows of
    :func:`val_patients` in manifest order)."""
    names = [member_name(name, m) for m in range(size(bench.variants, name))]
    if part != "val":
        return mean_probabilities([bench.probabilities(n, fold, part) for n in names])
    rows = cv.of(bench.rows, val_patients(bench, name, fold))
    out = None
    for n in names:
        own = bench.probabilities(n, fold, "val")
        if out is None:
            out = np.zeros((len(rows), *own.shape[1:]), dtype=np.uint8)
        where = rows.index.get_indexer(cv.of(bench.rows, val_patients(bench, n, fold)).index)
        out[where] = own
    return out


# --- report ----------------------------------------------------------------------------------


def ensemble_table(bench, patients: pd.DataFrame, n_boot: int) -> str:
    """Fold ensemble minus its best member (highest mean volume Dice over the patients, per
    condition), paired per patient, bootstrap 95 % CIs of the mean."""
    lines = [
        "| fold ensemble − best member | condition | best member (volume Dice) | "
        + " | ".join(f"{label} mean [95 % CI]" for label in SEG_COLUMNS.values())
        + " |",
        "| --- | --- | --- |" + " ---: |" * len(SEG_COLUMNS),
    ]
    done = set(patients["variant"]) if not patients.empty else set()
    for name in [n for n in bench.variants if n in done and is_ensemble(bench, n)]:
        for condition in ("original", "flair_only"):
            chosen = patients[patients["condition"] == condition]
            own = chosen[chosen["variant"] == name].set_index("patient")
            names = [member_name(name, m) for m in range(size(bench.variants, name))]
            means = {n: chosen.loc[chosen["variant"] == n, "volume_dice"].mean() for n in names
                     if n in done}  # fmt: skip
            if own.empty or not means:
                continue
            best = max(means, key=lambda n: means[n])
            ref = chosen[chosen["variant"] == best].set_index("patient")
            cells = [name, condition, f"{best} ({means[best]:.3f})"]
            cells += [_ci(paired_difference(own[c], ref[c], n_boot)) for c in SEG_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""
