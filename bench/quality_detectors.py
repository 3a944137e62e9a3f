"""Tumor / no-tumor detectors of the quality benchmark (issue 27; bench/quality.py drives it):
classifier inputs at their own array size (``array_size``) and with the second dataset in
training (``second_dataset``), post-hoc ensembles of the cached detectors (the top-level
``ensembles`` key of the variants file, decided by the package's
:func:`brainmri.evaluation.decision.ensemble_decision`), and the cascade gate's cost: the share
of the reference segmentation's true-positive pixels that
:func:`brainmri.evaluation.decision.gate` drops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import quality_cv as cv
from brainmri.data.preprocess import preprocess_btm
from brainmri.errors import InputError
from brainmri.evaluation import decision
from brainmri.evaluation.bootstrap import grouped_bootstrap
from brainmri.evaluation.decision import EnsembleRule, ensemble_decision, gate
from brainmri.tables import read_manifest

CLASSIFIER_KEYS = ("array_size", "second_dataset")
METHODS = decision.METHODS  # majority | soft | segmentation (the voter alone decides)
ENSEMBLE_KEYS = ("classifiers", "segmentation", "method", "smooth_window", "note")
SECOND_ARCHIVE = "brain-tumor-mri-dataset"


# --- the variants file -----------------------------------------------------------------------


def check_classifier_keys(path: Path, name: str, variant: dict[str, Any]) -> None:
    """``array_size`` (a size >= 16 px) and ``second_dataset`` (true/false): classifiers only."""
    own = [key for key in CLASSIFIER_KEYS if key in variant]
    if own and variant.get("kind", "recipe") != "classifier":
        raise InputError(f"{path}: variant {name}: {own} only apply to kind: classifier")
    size = variant.get("array_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 16):
        raise InputError(
            f"{path}: variant {name}: array_size must be an integer >= 16, not {size!r}"
        )
    if not isinstance(variant.get("second_dataset", False), bool):
        raise InputError(f"{path}: variant {name}: second_dataset must be true or false")


def check_ensembles(path: Path, spec: dict[str, Any], variants: dict[str, dict]) -> None:
    """The ``ensembles`` mapping: classifier voters, an optional segmentation voter (a
    segmentation variant), ``method`` and an odd ``smooth_window``; one-line errors."""
    ensembles = spec.get("ensembles") or {}
    if not isinstance(ensembles, dict):
        raise InputError(f"{path}: ensembles must be a mapping of name: settings")

    def kind(name: str) -> str:
        variant = variants[name]
        return variants.get(variant.get("models_from"), variant).get("kind", "recipe")

    for name, ensemble in ensembles.items():
        where = f"{path}: ensemble {name}"
        if name in variants:
            raise InputError(f"{where}: the name is also a variant's")
        if not isinstance(ensemble, dict):
            raise InputError(f"{where}: expected a mapping")
        unknown = sorted(set(ensemble) - set(ENSEMBLE_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}")
        members = ensemble.get("classifiers")
        if not isinstance(members, list) or not members:
            raise InputError(f"{where}: classifiers must be a non-empty list of variants")
        for member in members:
            if member not in variants or kind(member) != "classifier":
                raise InputError(f"{where}: {member!r} is no classifier variant")
        seg = ensemble.get("segmentation")
        if seg is not None and (seg not in variants or kind(seg) == "classifier"):
            raise InputError(f"{where}: segmentation {seg!r} is no segmentation variant")
        if ensemble.get("method", "majority") not in METHODS:
            raise InputError(f"{where}: method must be one of {METHODS}")
        if ensemble.get("method") == "segmentation" and seg is None:
            raise InputError(f"{where}: method segmentation needs a segmentation variant")
        window = ensemble.get("smooth_window", 1)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise InputError(f"{where}: smooth_window must be an odd integer >= 1, not {window!r}")


# --- classifier inputs -----------------------------------------------------------------------


def array_size(bench, name: str) -> int:
    """The array size of a classifier variant's data: its ``array_size``, else ``--size``."""
    return int(bench.variants[name].get("array_size") or bench.args.size)


def matching_rows(reference: pd.DataFrame, rows: pd.DataFrame, where: Path) -> pd.DataFrame:
    """``rows`` of the reference's slices (index 0..n-1, as the reference's), refused unless
    they hold the reference's ids, patients and slice numbers in the same order."""
    own = rows[rows["id"].isin(set(reference["id"]))].reset_index(drop=True)
    columns = ["id", "patient", "slice_index"]
    if (
        len(own) != len(reference)
        or not (own[columns].to_numpy() == reference[columns].to_numpy()).all()
    ):
        raise InputError(
            f"{where}: its LGG slices differ from the benchmark's --size arrays (ids, patients "
            "or order; a data folder from another archive?): remove it to rebuild it"
        )
    return own.set_index(reference.index)


def classifier_data(bench, name: str) -> tuple[Path, pd.DataFrame]:
    """Data folder and LGG rows of a classifier variant (its ``array_size``; the benchmark's
    own at ``--size``); the rows are the benchmark's slices in its order."""
    size = array_size(bench, name)
    if size == bench.args.size:
        return bench.data, bench.rows
    data = cv.prepare_data(bench.args.data, bench.work, size)
    return data, matching_rows(bench.rows, cv.load_rows(data), data / "manifest.csv")


def prepare_second_dataset(source: Path, work: Path, data: Path, size: int) -> pd.DataFrame:
    """Rows of the second dataset's glioma / notumor images, preprocessed as the workflow does
    (:func:`brainmri.data.preprocess.preprocess_btm`) into ``<data>/btm`` (built once)."""
    manifest = data / "btm" / "manifest.csv"
    if not manifest.is_file():
        raw = cv.raw_folder(source, SECOND_ARCHIVE, work / "raw_btm")
        btm = data / "btm"
        preprocess_btm(raw, size, btm / "png", btm / "images.npy", manifest, 2)
    return read_manifest(manifest)


def training_rows(bench, name: str, data: Path, train: pd.DataFrame) -> pd.DataFrame:
    """A classifier fold's training rows: its LGG patients' slices and, with
    ``second_dataset``, every second-dataset image (training only; index 0..n-1)."""
    if not bench.variants[name].get("second_dataset"):
        return train
    extra = prepare_second_dataset(bench.args.data, bench.work, data, array_size(bench, name))
    return pd.concat([train, extra], ignore_index=True)


def classifier_settings(variant: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``input_size`` = the variant's ``array_size`` unless the variant sets ``input_size``."""
    if variant.get("array_size") and "input_size" not in variant:
        settings["input_size"] = int(variant["array_size"])
    return settings


# --- post-hoc ensembles ----------------------------------------------------------------------


def _member(slices: pd.DataFrame, detector: str, fold: int, ids: np.ndarray) -> pd.DataFrame:
    own = slices[(slices["detector"] == detector) & (slices["fold"] == fold)]
    return own.set_index("id").loc[ids]


def ensemble_slices(
    slices: pd.DataFrame,
    rows: pd.DataFrame,
    name: str,
    ensemble: dict[str, Any],
    cutoff: float,
) -> pd.DataFrame:
    """Per-slice rows (as the detectors') of one ensemble of cached detectors: per fold, the
    classifiers' P(tumor) and, with ``segmentation``, that variant's mask areas and its
    fold's k, decided by :func:`ensemble_decision` (smoothing along (patient, slice number));
    ``score`` is the mean probability over the voters, ``min_pixels`` the voter's k."""
    members = ensemble["classifiers"]
    seg = ensemble.get("segmentation")
    slice_number = rows.set_index("id")["slice_index"]
    out = []
    for fold, base in slices[slices["detector"] == members[0]].groupby("fold", sort=True):
        base = base.sort_values("id").reset_index(drop=True)
        ids = base["id"].to_numpy()
        probs = np.stack([_member(slices, m, fold, ids)["score"].to_numpy() for m in members])
        areas, k = None, None
        if seg is not None:
            voter = _member(slices, f"seg:{seg}", fold, ids)
            areas, k = voter["score"].to_numpy(), int(voter["min_pixels"].iloc[0])
        rule = EnsembleRule(
            ensemble.get("method", "majority"), cutoff, k, int(ensemble.get("smooth_window", 1))
        )
        order = (base["patient"].to_numpy(), slice_number.loc[ids].to_numpy())
        decision = ensemble_decision(rule, probs, areas, order)
        out.append(
            base.assign(detector=name, pred=decision.pred, score=decision.probability, min_pixels=k)
        )
    return pd.concat(out, ignore_index=True)


def ensembles_of(bench, slices: pd.DataFrame) -> tuple[list[pd.DataFrame], list[str]]:
    """Slices of every ensemble of the variants file whose members are all scored; the names
    of the others (unfinished)."""
    cutoff = float(bench.config["classification"].get("threshold", 0.5))
    done = set(slices["detector"]) if not slices.empty else set()
    frames, unfinished = [], []
    for name, ensemble in (bench.spec.get("ensembles") or {}).items():
        needed = list(ensemble["classifiers"])
        if ensemble.get("segmentation") is not None:
            needed.append(f"seg:{ensemble['segmentation']}")
        if not set(needed) <= done:
            unfinished.append(name)
            continue
        frames.append(ensemble_slices(slices, bench.rows, name, ensemble, cutoff))
    return frames, unfinished


# --- the cascade's gate ----------------------------------------------------------------------


def gate_pixels(
    masks: np.ndarray, truth: np.ndarray, pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: the masks' true-positive pixels, and those :func:`gate` keeps with ``pred``."""
    masks, truth = np.asarray(masks).astype(bool), np.asarray(truth).astype(bool)
    n = len(masks)
    found = (masks & truth).reshape(n, -1).sum(1)
    kept = (gate(masks, pred) & truth).reshape(n, -1).sum(1)
    return found, kept


def gate_drop_share(
    found: np.ndarray, kept: np.ndarray, patients: np.ndarray, n_boot: int = 2_000
) -> dict[str, float]:
    """Share (%) of all true-positive pixels that the gate drops, pooled over slices, with a
    percentile CI over resampled patients."""
    found, dropped = np.asarray(found, dtype=float), np.asarray(found - kept, dtype=float)

    def share(i: np.ndarray) -> float:
        total = found[i].sum()
        return float(100 * dropped[i].sum() / total) if total else float("nan")

    low, high = grouped_bootstrap(np.asarray(patients), share, n_boot)
    return {"value": share(np.arange(len(found))), "ci_low": low, "ci_high": high}


def reference_masks(bench, score) -> np.ndarray | None:
    """The reference segmentation variant's post-processed test masks of every slice (the
    benchmark's row order; each slice by the fold that held its patient out); None when not
    all cached."""
    reference = bench.spec["reference"]
    masks = np.zeros(bench.truth.shape, dtype=bool)
    inference = bench.inference(reference)
    for fold in bench.plan:
        tta = int(bool(inference["tta"]))
        owner = bench.variants[reference].get("models_from") or reference
        path = bench.work / "probs" / f"{owner}-tta{tta}" / f"fold{fold.number}-test.npy"
        if not path.is_file():
            return None
        rows = cv.of(bench.rows, fold.test)
        masks[rows.index] = score.masks_of(bench.probabilities(reference, fold, "test"), rows,
                                           inference)  # fmt: skip
    return masks


def detector_columns(
    bench, score, slices: pd.DataFrame, summaries: dict[str, Any], n_boot: int
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Extra columns of the detector table (``{header: {detector: cell}}``): accuracy minus the
    best single classifier for the ensembles, and the gate's drop share of the reference
    segmentation's true-positive pixels for every detector; and lines naming the best."""
    columns: dict[str, dict[str, str]] = {}
    lines: list[str] = []
    by_id = {n: g.set_index("id").loc[bench.rows["id"]].reset_index() for n, g in
             slices.groupby("detector", sort=False)}  # fmt: skip
    classifiers = [n for n in summaries if n in bench.variants and bench.kind(n) == "classifier"]
    ensembles = [n for n in summaries if n in (bench.spec.get("ensembles") or {})]
    if classifiers:
        best = max(classifiers, key=lambda n: summaries[n]["accuracy"]["value"])
        header = f"accuracy − best single classifier ({best}) [95 % CI]"
        columns[header] = {}
        for name in ensembles:
            diff = score.pooled_difference(by_id[name], by_id[best], n_boot)
            columns[header][name] = score._ci(diff)
        lines.append(
            f"Best single classifier (highest pooled accuracy on these test slices, so chosen "
            f"on them): {best}, accuracy {summaries[best]['accuracy']['value']:.3f}."
        )
    masks = reference_masks(bench, score)
    if masks is not None:
        header = "gate drops % of seg TP pixels [95 % CI]"
        columns[header] = {}
        patients = bench.rows["patient"].to_numpy()
        total = int((masks & bench.truth).sum())
        for name, frame in by_id.items():
            found, kept = gate_pixels(masks, bench.truth, frame["pred"].to_numpy())
            d = gate_drop_share(found, kept, patients, n_boot)
            columns[header][name] = f"{d['value']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"
        lines.append(
            f"Gate: the share of the true-positive pixels of {bench.spec['reference']}'s "
            f"post-processed masks ({total} pixels over all test slices) that the "
            "cascade drops where the detector says no tumor (brainmri.evaluation.decision.gate)."
        )
    return columns, lines
