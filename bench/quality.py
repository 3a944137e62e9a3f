"""Quality benchmark (``make quality``): patient-level cross-validation over every patient of a
Kaggle-layout LGG folder, every variant given the same CPU-seconds training budget per fold,
per-patient paired differences against a reference variant with bootstrap 95 % CIs.

  python bench/quality.py --data ../shared/data/kaggle-40 --work results/quality \\
      --variants bench/quality_variants.yaml --size 64 --folds 4 --budget 150

For each outer fold the model trains on the fold's training patients, its checkpoint (and the
segmentation detector's k) is chosen on inner validation patients taken from those, and it
scores the fold's test patients, so every patient is scored once by a model that never saw it
and was not chosen on it. Every patient is scored twice: as it is, and with its pre- and
post-contrast channels replaced by FLAIR (the FLAIR-only case on every patient).

Variants (a YAML, one entry each) are overrides of the config's U-Net settings
(``kind: recipe``), the plain loop of bench/plain_loop.py (``kind: plain``), a classifier
(``kind: classifier``), nnU-Net v2 (``kind: nnunet``, bench/quality_nnunet.py), MONAI's 2-D
tutorial recipe (``kind: monai``, bench/quality_monai.py; both need
bench/requirements-nnunet.txt), or inference-only changes of another variant's models
(``models_from: <variant>`` with ``tta`` / ``postprocess`` / ``threshold``: no training).
A recipe variant with ``members: N`` is the workflow's fold ensemble inside each outer fold
(bench/quality_members.py): N member models, scored as the mean of their probabilities and
each as a variant ``<name>/m<m>`` of its own.
Models and probabilities are cached under ``--work``: a rerun only does what is missing, and
``--only`` runs some variants (e.g. several processes in parallel) before one ``--report``.

Writes ``<work>/quality.md`` (tables), ``<work>/patients.csv`` (per patient, variant and
condition), ``<work>/detectors.csv`` (per slice decisions), ``<work>/plan.csv`` (and
``<work>/members<N>_plan.csv`` for ensembles).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import quality_cv as cv
from bench import quality_detectors as detectors
from bench import quality_members as members
from bench import quality_monai, quality_nnunet
from bench import quality_score as score
from brainmri.config import STAGE_KEYS, training_settings
from brainmri.errors import InputError
from brainmri.io import run_cli, setup_logging, write_csv, write_npy
from brainmri.tables import gather

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
KINDS = ("recipe", "plain", "classifier", "nnunet", "monai")
INFERENCE_KEYS = ("tta", "postprocess", "threshold")
OWN_KEYS = ("kind", "models_from", "flair_copies", "note", "backbone", "arch", "encoder")
OWN_KEYS += detectors.CLASSIFIER_KEYS
OWN_KEYS += ("encoder_depth", "budget")
PLAIN = {"arch": "Unet", "encoder": "resnet18", "batch_size": 16, "lr": 1e-3}


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, nested dicts merged (as Snakemake merges --configfile)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: cannot read it as YAML ({error})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return loaded


def load_variants(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The variants file: its header (base configs, reference, common settings) and variants,
    checked (unknown keys, kinds and ``models_from`` targets are one-line errors)."""
    spec = read_yaml(path)
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise InputError(f"{path}: no 'variants' mapping")
    allowed = set(OWN_KEYS) | set(INFERENCE_KEYS) | set(STAGE_KEYS["segmentation"])
    allowed |= set(STAGE_KEYS["classification"])
    allowed.add(members.KEY)  # an ensemble of N members (bench/quality_members.py)
    for name, variant in variants.items():
        variant = variants[name] = variant or {}
        unknown = sorted(set(variant) - allowed)
        if unknown:
            raise InputError(f"{path}: variant {name}: unknown key(s) {unknown}")
        if variant.get("kind", "recipe") not in KINDS:
            raise InputError(f"{path}: variant {name}: kind must be one of {KINDS}")
        detectors.check_classifier_keys(path, name, variant)
        source = variant.get("models_from")
        if source is not None:
            if source not in variants or variants[source].get("models_from"):
                raise InputError(f"{path}: variant {name}: models_from {source!r} is no variant")
            extra = sorted(set(variant) - {"models_from", "note", *INFERENCE_KEYS})
            if extra:
                raise InputError(
                    f"{path}: variant {name}: with models_from only {INFERENCE_KEYS} may "
                    f"change, not {extra}"
                )
        budget = variant.get("budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                                   or budget <= 0):  # fmt: skip
            raise InputError(f"{path}: variant {name}: budget must be a positive number of "
                             f"seconds, not {budget!r}")  # fmt: skip
    members.check_variants(path, variants)
    reference = spec.get("reference")
    if reference not in variants:
        raise InputError(f"{path}: reference {reference!r} is not a variant")
    for other in spec.get("also_against", []):
        if other not in variants:
            raise InputError(f"{path}: also_against: {other!r} is not a variant")
    detectors.check_ensembles(path, spec, variants)
    return spec, variants


class Bench:
    """One benchmark run: data, plan, variants, settings and the cache folders."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work
        self.spec, self.variants = load_variants(args.variants)
        self.variants = members.expand(self.variants)  # an ensemble's members: variants too
        self.config: dict[str, Any] = {}
        for name in self.spec.get("base", ["config/config.yaml", "config/cpu.yaml"]):
            self.config = deep_merge(self.config, read_yaml(REPO / name))
        self.data = cv.prepare_data(args.data, self.work, args.size)
        self.rows = cv.load_rows(self.data)
        if args.patients:
            keep = sorted(self.rows["patient"].unique())[: args.patients]
            self.rows = self.rows[self.rows["patient"].isin(keep)].reset_index(drop=True)
        self.plan = cv.cv_plan(self.rows, args.folds, args.inner_val, args.seed)
        write_csv(self.work / "plan.csv", cv.plan_table(self.plan))
        members.write_plans(self)
        self.truth = gather(self.data, self.rows, "masks").astype(bool)

    # --- settings ---------------------------------------------------------------------------

    def owner(self, name: str) -> dict[str, Any]:
        """The variant whose models ``name`` uses: its ``models_from`` variant, else itself."""
        variant = self.variants[name]
        return self.variants.get(variant.get("models_from"), variant)

    def kind(self, name: str) -> str:
        return self.owner(name).get("kind", "recipe")

    def settings(self, name: str) -> dict[str, Any]:
        """Training settings of a variant's models (its ``models_from`` variant's)."""
        variant = self.owner(name)
        kind = variant.get("kind", "recipe")
        common = dict(self.spec.get("common", {}).get(kind, {}))
        if kind == "classifier":
            backbone = variant.get("backbone", "resnet18")
            settings = training_settings(self.config, "classification", backbone)
            keys = STAGE_KEYS["classification"]
        elif kind == "plain":
            settings, keys = {"name": "plain", **PLAIN}, ("batch_size", "lr", "encoder")
        elif kind in ("nnunet", "monai"):  # nnU-Net plans itself; MONAI: the tutorial's
            settings = {"name": kind, **(quality_monai.SETTINGS if kind == "monai" else {})}
            keys = ("batch_size", "lr") if kind == "monai" else ()
        else:
            settings = training_settings(self.config, "segmentation", "unet")
            keys = (*STAGE_KEYS["segmentation"], "arch", "encoder", "encoder_depth")
        if kind != "classifier":
            settings["input_size"] = self.args.size
        for layer in (common, variant):
            settings.update({k: copy.deepcopy(v) for k, v in layer.items() if k in keys})
        if kind == "classifier":
            detectors.classifier_settings(variant, settings)
        if self.args.epochs is not None and kind in ("recipe", "classifier"):
            settings["epochs"] = self.args.epochs
        return settings

    def budget(self, name: str) -> float:
        """Training seconds of each of a variant's fold models: its own ``budget`` (e.g. a
        slower precision given the epochs of the reference), else ``--budget``."""
        return float(self.owner(name).get("budget", self.args.budget))

    def seed(self, fold: cv.Fold) -> int:
        """The training seed of an outer fold's models (an ensemble's members share it)."""
        return self.args.seed + 1000 * fold.number

    def inference(self, name: str) -> dict[str, Any]:
        """tta, postprocess, threshold of a variant (plain, monai: none, their own; nnunet:
        nnU-Net's predictor with its mirroring as ``tta``, no post-processing of ours)."""
        section = self.config["segmentation"]
        if self.kind(name) == "plain":
            base = {"tta": False, "postprocess": {}, "threshold": 0.5}
        elif self.kind(name) in ("nnunet", "monai"):
            own = quality_nnunet if self.kind(name) == "nnunet" else quality_monai
            base = copy.deepcopy(own.INFERENCE)
        else:
            base = {k: copy.deepcopy(section.get(k)) for k in INFERENCE_KEYS}
        own = self.variants[name]
        source = self.variants[own["models_from"]] if own.get("models_from") else {}
        common = self.spec.get("common", {}).get(self.kind(name), {})
        for layer in (common, source, own):
            base.update({k: copy.deepcopy(v) for k, v in layer.items() if k in INFERENCE_KEYS})
        base["postprocess"] = base.get("postprocess") or {}
        return base

    def model_dir(self, name: str, fold: cv.Fold) -> Path:
        owner = self.variants[name].get("models_from") or name
        folder = self.work / "models" / owner / f"fold{fold.number}"
        member = self.variants[name].get("member")
        return folder if member is None else folder / f"m{member}"

    def val_patients(self, name: str, fold: cv.Fold) -> tuple[str, ...]:
        """The patients a variant's checkpoint and detector k are chosen on."""
        return members.val_patients(self, name, fold)

    def probs_path(self, name: str, fold: cv.Fold, part: str) -> Path:
        """Where a variant's ``val`` / ``test`` / ``flair`` probabilities are cached."""
        tta = bool(self.inference(name)["tta"])
        owner = self.variants[name].get("models_from") or name
        stem = members.probs_stem(self, name, fold, part)
        return self.work / "probs" / f"{owner}-tta{int(tta)}" / f"{stem}.npy"

    # --- running -----------------------------------------------------------------------------

    def train(self, name: str, fold: cv.Fold) -> dict[str, Any]:
        """Train (or find) one fold model of a variant; its info.json."""
        if members.size(self.variants, name):
            return members.train(self, name, fold)
        folder = self.model_dir(name, fold)
        info_path = folder / "info.json"
        if info_path.is_file():
            return yaml.safe_load(info_path.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        kind, settings = self.kind(name), self.settings(name)
        seed, budget = self.seed(fold), self.budget(name)
        log.info("%s fold %d: training (%s, budget %.0f %s-s)", name, fold.number, kind, budget,
                 self.args.clock)  # fmt: skip
        if kind == "plain":  # no validation: it trains on every training patient
            both = cv.of(self.rows, fold.train + fold.val)
            info = cv.train_plain(settings, self.data, both, budget, self.args.clock, seed, folder)
        elif kind == "classifier":
            source = self.variants[name].get("models_from") or name
            data, own = detectors.classifier_data(self, source)
            train, val = cv.of(own, fold.train), cv.of(own, fold.val)
            train = detectors.training_rows(self, source, data, train)
            setup, info = cv.budgeted_fit(
                "classification", settings, data, train, val, budget, self.args.clock,
                seed, folder,
            )  # fmt: skip
            info.update(array_size=detectors.array_size(self, source),
                        second_dataset_slices=int((train["source"] == "btm").sum()))  # fmt: skip
            for part, rows in (("val", val), ("test", cv.of(own, fold.test))):
                frame = rows[["id", "patient", "has_tumor"]].assign(
                    prob_tumor=cv.classifier_probabilities(setup, rows)
                )
                write_csv(folder / f"{part}.csv", frame)
        elif kind == "nnunet":
            info = quality_nnunet.train(self, name, fold, folder)
        elif kind == "monai":
            info = quality_monai.train(settings, self.data, cv.of(self.rows, fold.train),
                                       cv.of(self.rows, fold.val), budget, self.args.clock,
                                       seed, folder)  # fmt: skip
        else:
            info = self.train_recipe(name, fold, fold.train, fold.val, folder)
        info.update(fold=fold.number, kind=kind, clock=self.args.clock, budget=budget)
        cv.write_info(info_path, info)
        return info

    def train_recipe(
        self, name: str, fold: cv.Fold, train: tuple[str, ...], val: tuple[str, ...], folder: Path
    ) -> dict[str, Any]:
        """A recipe segmenter of a variant (a fold model, or an ensemble's member) trained on
        the ``train`` patients and chosen on ``val``, with the outer fold's seed and the
        variant's budget (FLAIR-only copies where its owner asks): what it cost."""
        rows_train, rows_val = cv.of(self.rows, train), cv.of(self.rows, val)
        if self.owner(name).get("flair_copies"):
            rows_train = cv.with_flair_copies(rows_train)
        return cv.train_segmenter(self.settings(name), self.data, rows_train, rows_val,
                                  self.budget(name), self.args.clock, self.seed(fold),
                                  folder)  # fmt: skip

    def probabilities(self, name: str, fold: cv.Fold, part: str) -> np.ndarray:
        """Stored probabilities of a fold's ``val``, ``test`` or ``flair`` (FLAIR-only test)
        slices by the variant's fold model, cached by model and TTA."""
        tta = bool(self.inference(name)["tta"])
        path = self.probs_path(name, fold, part)
        if path.is_file():
            return np.load(path)
        patients = self.val_patients(name, fold) if part == "val" else fold.test
        rows = cv.of(self.rows, patients)
        if members.is_ensemble(self, name):
            stored = members.ensemble_probabilities(self, name, fold, part)
        elif self.kind(name) == "nnunet":
            stored = quality_nnunet.probabilities(self, name, fold, part)
        elif self.kind(name) == "monai":
            stored = quality_monai.probabilities(self.model_dir(name, fold), self.data, rows,
                                                 part == "flair")  # fmt: skip
        else:
            stored = cv.segment(self.model_dir(name, fold) / "model.pt", self.data, rows, tta,
                                part == "flair")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npy(path, stored)
        return stored

    def run(self, name: str, folds: list[int] | None = None) -> None:
        for fold in self.plan:
            if folds is not None and fold.number not in folds:
                continue
            self.train(name, fold)
            if self.kind(name) != "classifier":
                for part in ("val", "test", "flair"):
                    self.probabilities(name, fold, part)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path, help="Kaggle-layout folder")
    parser.add_argument("--work", required=True, type=Path, help="cache and results folder")
    parser.add_argument("--variants", type=Path, default=REPO / "bench" / "quality_variants.yaml")
    parser.add_argument("--only", nargs="+", help="run only these variants (default: all)")
    parser.add_argument("--fold", nargs="+", type=int, help="run only these outer folds")
    parser.add_argument("--report", action="store_true", help="only score what is cached")
    parser.add_argument("--size", type=int, default=64, help="array and input size (px)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--inner-val", type=float, default=0.15, help="inner validation share")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per fold")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--epochs", type=int, help="override every variant's epochs")
    parser.add_argument("--patients", type=int, help="only the first N patients (tests)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n-boot", type=int, default=10_000)
    return parser.parse_args(argv)


def select(bench: Bench, only: list[str] | None) -> list[str]:
    """The variants to run: ``--only``'s (checked), else all of the file except the nnunet /
    monai ones whose package is not installed (a warning each; the report lists them as not
    finished). Named with ``--only``, those fail on their first fold with the install line."""
    if only:
        unknown = sorted(set(only) - set(bench.variants))
        if unknown:
            raise InputError(f"--only: unknown variant(s) {unknown} (in {bench.args.variants})")
        return list(only)
    names = []
    for name in bench.variants:
        kind = bench.kind(name)
        reason = {"nnunet": quality_nnunet.available, "monai": quality_monai.available}.get(
            kind, lambda: None
        )()
        if reason:
            log.warning("%s: skipped, %s", name, reason)
        else:
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    cv.setup_threads(args.threads)
    bench = Bench(args)
    names = select(bench, args.only)
    if not args.report:
        for name in names:
            bench.run(name, args.fold)
    from bench.quality_report import write_report

    write_report(bench, score)


if __name__ == "__main__":
    run_cli(main)
