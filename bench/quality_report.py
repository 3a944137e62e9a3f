"""The quality benchmark's outputs from its cache: per-patient and per-slice CSVs and the
markdown tables (bench/quality.py calls :func:`write_report`)."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import quality_cv as cv
from bench import quality_detectors as detectors
from bench import quality_members as members
from brainmri.io import write_csv, write_text


def _folds_done(bench, name: str) -> bool:
    for fold in bench.plan:
        folder = bench.model_dir(name, fold)
        if not (folder / "info.json").is_file():
            return False
        if bench.kind(name) == "classifier":
            continue
        if not all(bench.probs_path(name, fold, p).is_file() for p in ("val", "test", "flair")):
            return False
    return True


def _info(bench, name: str) -> dict[str, Any]:
    infos = [
        json.loads((bench.model_dir(name, fold) / "info.json").read_text()) for fold in bench.plan
    ]
    return {
        "seconds_per_fold": float(np.mean([i["seconds"] for i in infos])),
        "epochs": [i.get("epochs_run", i.get("epochs_started")) for i in infos],
        "stopped_by": [i.get("stopped_by", "budget") for i in infos],
    }


def _slices(bench, rows: pd.DataFrame, pred, score_values, name: str, fold: int, k=None):
    return pd.DataFrame(
        {
            "detector": name,
            "fold": fold,
            "id": rows["id"].to_numpy(),
            "patient": rows["patient"].to_numpy(),
            "label": rows["has_tumor"].to_numpy(dtype=int),
            "pred": np.asarray(pred, dtype=int),
            "score": np.asarray(score_values, dtype=float),
            "true_area": rows["tumor_area"].to_numpy(dtype=int),
            "min_pixels": k,
        }
    )


def collect(bench, score) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], list[str]]:
    """Per-patient segmentation rows, per-slice detector rows, variant info, unfinished."""
    patients, slices, info, unfinished = [], [], {}, []
    cut = float(bench.config["classification"].get("threshold", 0.5))
    for name in bench.variants:
        if not _folds_done(bench, name):
            unfinished.append(name)
            continue
        info[name] = _info(bench, name)
        if bench.kind(name) == "classifier":
            for fold in bench.plan:
                frame = pd.read_csv(bench.model_dir(name, fold) / "test.csv")
                rows = bench.rows.set_index("id").loc[frame["id"]].reset_index()
                prob = frame["prob_tumor"].to_numpy()
                slices.append(_slices(bench, rows, prob >= cut, prob, name, fold.number))
            continue
        inference = bench.inference(name)
        for condition, part in (("original", "test"), ("flair_only", "flair")):
            for fold in bench.plan:
                rows = cv.of(bench.rows, fold.test)
                stored = bench.probabilities(name, fold, part)
                frame = score.segmentation_patients(
                    rows, stored, bench.truth[rows.index], inference
                )
                patients.append(frame.reset_index().assign(variant=name, condition=condition,
                                                           fold=fold.number))  # fmt: skip
                if condition == "original":
                    val = cv.of(bench.rows, bench.val_patients(name, fold))
                    val_stored = bench.probabilities(name, fold, "val")
                    pred, areas, k = score.detector(val, val_stored, rows, stored, inference)
                    slices.append(_slices(bench, rows, pred, areas, f"seg:{name}", fold.number, k))
    patients_frame = pd.concat(patients, ignore_index=True) if patients else pd.DataFrame()
    slices_frame = pd.concat(slices, ignore_index=True) if slices else pd.DataFrame()
    ensembles, waiting = detectors.ensembles_of(bench, slices_frame)
    unfinished += waiting
    if ensembles:
        slices_frame = pd.concat([slices_frame, *ensembles], ignore_index=True)
    if not slices_frame.empty:
        slices_frame["quartile"] = 0
        for _, group in slices_frame.groupby("detector"):
            slices_frame.loc[group.index, "quartile"] = score.area_quartiles(group["true_area"])
    return patients_frame, slices_frame, info, unfinished


def write_report(bench, score) -> Path:
    """``quality.md``, ``patients.csv`` and ``detectors.csv`` under the work folder."""
    args = bench.args
    patients, slices, info, unfinished = collect(bench, score)
    reference = bench.spec["reference"]
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    lines = [
        "# Quality benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"{len(bench.rows['patient'].unique())} patients, {len(bench.rows)} slices at "
        f"{args.size} px; {args.folds} outer folds, inner validation {args.inner_val:.0%} of "
        f"each fold's training patients; training budget {args.budget:.0f} {args.clock}-seconds "
        f"per fold model, {args.threads} threads; Python {platform.python_version()}.",
        "Differences: per patient, variant minus reference, mean and percentile bootstrap 95 % "
        f"CI over patients ({args.n_boot} draws); **\\*** marks a CI that excludes zero.",
        "",
    ]
    if unfinished:
        lines += [f"Not finished (no table row): {', '.join(unfinished)}", ""]
    if not patients.empty:
        write_csv(bench.work / "patients.csv", patients)
        lines += ["## Segmentation", "", score.segmentation_table(patients, info), ""]
        for against in (reference, *bench.spec.get("also_against", [])):
            for condition in ("original", "flair_only"):
                table = score.difference_table(patients, against, condition, args.n_boot)
                if table:
                    lines += [table, ""]
        table = members.ensemble_table(bench, patients, args.n_boot)
        if table:
            lines += ["Fold ensembles (`members`) against their best member:", "", table, ""]
        epochs = {n: f"{i['epochs']} ({', '.join(sorted(set(i['stopped_by'])))})"
                  for n, i in info.items()}  # fmt: skip
        lines += ["Epochs per fold (stopped by): "
                  + "; ".join(f"{n} {e}" for n, e in epochs.items()), ""]  # fmt: skip
    if not slices.empty:
        write_csv(bench.work / "detectors.csv", slices)
        summaries, diffs = {}, {}
        base = f"seg:{reference}"
        for name, group in slices.groupby("detector", sort=False):
            group = group.sort_values("id").reset_index(drop=True)
            summaries[name] = score.classification_summary(group, min(args.n_boot, 2000))
            if name != base and base in set(slices["detector"]):
                ref = slices[slices["detector"] == base].sort_values("id").reset_index(drop=True)
                diffs[name] = score.pooled_difference(group, ref, min(args.n_boot, 2000))
        extra, notes = detectors.detector_columns(bench, score, slices, summaries,
                                                  min(args.n_boot, 2000))  # fmt: skip
        chosen = slices.dropna(subset=["min_pixels"]).groupby(["detector", "fold"])
        ks = chosen["min_pixels"].first().groupby(level=0).agg(list)
        lines += [
            "## Tumor / no-tumor detectors",
            "",
            f"Pooled over all slices; [95 % CI] by resampling patients; reference {base}. "
            "seg:<variant>: tumor when the post-processed mask has >= k pixels, k chosen per "
            "fold on the inner validation slices.",
            "",
            score.classification_table(summaries, diffs, extra),
            "",
            *[line for note in notes for line in (note, "")],
            "k per fold: " + "; ".join(f"{n} {list(map(int, v))}" for n, v in ks.items()),
            "",
        ]
    path = bench.work / "quality.md"
    write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
