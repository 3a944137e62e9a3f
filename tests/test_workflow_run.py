"""The whole workflow on the tiny config: outputs, reruns that redo nothing, a targeted rerun,
and no leaked Kaggle secret."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml
from helpers import FAKE_SECRET, TINY_CONFIG, snakemake

pytestmark = pytest.mark.slow


def planned_jobs(results, *extra: str) -> dict[str, int]:
    """Job counts per rule of a dry run."""
    result = snakemake(
        "-n", "--configfile", str(TINY_CONFIG), "--config", f"results_dir={results}", *extra
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE)}


def test_every_stage_wrote_its_results(workflow_run):
    results = workflow_run
    config = yaml.safe_load(TINY_CONFIG.read_text())
    for model in [*config["classification"]["backbones"], "ensemble"]:
        metrics = json.loads((results / "classification" / model / "test_metrics.json").read_text())
        assert 0 <= metrics["accuracy"] <= 1 and metrics["n"] > 0
    for arch in ("unet", "fpn"):
        for fold in (0, 1):
            for split in ("val", "test"):
                path = results / "segmentation" / arch / f"fold{fold}" / f"{split}_metrics.json"
                assert json.loads(path.read_text())["tumor_slices"]["dice"]["mean"] is not None
    summary = json.loads((results / "segmentation" / "summary.json").read_text())
    assert set(summary["architectures"]) == {"unet", "fpn"}
    headline = json.loads((results / "report" / "metrics.json").read_text())
    assert headline["split_level"] == "patient" and headline["seed"] == 7
    assert "cascade" in headline and "ensemble" in headline["classification"]
    html = (results / "report" / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and "Table 2" in html
    assert 'src="http' not in html  # self-contained
    # Every training job is its own job with a benchmark file.
    benchmarks = {p.stem for p in (results / "benchmarks").rglob("*.tsv")}
    assert {
        "resnet10t",
        "mobilenetv3_small_050",
        "unet_fold0",
        "unet_fold1",
        "fpn_fold0",
        "fpn_fold1",
    } <= benchmarks
    # No resume state is left behind.
    assert not list(results.rglob("resume"))


def test_kaggle_secret_never_written(workflow_run):
    for path in workflow_run.parent.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET.encode() not in path.read_bytes(), path


def test_second_run_does_nothing(workflow_run):
    assert planned_jobs(workflow_run) == {}


def test_changing_one_backbone_reruns_only_that_backbone(workflow_run, tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["classification"]["backbones"] = [
        "resnet10t",
        {"name": "mobilenetv3_small_050", "lr": 0.002},
    ]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(workflow_run, "--configfile", str(changed))
    assert jobs.get("train_classifier") == 1
    assert "train_segmenter" not in jobs and "evaluate_segmenter" not in jobs
    assert "fetch" not in jobs and "preprocess_lgg" not in jobs and "split" not in jobs
    assert jobs.get("evaluate_classifier") == 2  # that backbone and the ensemble
    assert jobs.get("report") == 1


def test_cascade_and_ensemble_files_are_consistent(workflow_run):
    ensemble = pd.read_csv(workflow_run / "classification" / "ensemble" / "test_predictions.csv")
    cascade = pd.read_csv(workflow_run / "cascade" / "per_slice.csv")
    assert list(cascade["id"]) == list(ensemble["id"])
    assert (cascade["gate"].to_numpy() == ensemble["pred"].to_numpy()).all()
    # Where the gate says no tumor, the cascade predicts an empty mask.
    assert (cascade.loc[cascade["gate"] == 0, "cascade_pred_area"] == 0).all()
