"""Predict as a newcomer runs it: the rule target keeps the good predictions when some files
are unreadable, docs/predicting.md's predict commands work as written after a (tiny) demo, and a
missing model is one line naming the command that trains it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, TINY_CONFIG, run_script, snakemake
from PIL import Image

pytestmark = pytest.mark.slow


def scans(folder: Path, source: Path, bad: bool = True) -> Path:
    """Three good images from the run's own data, and (bad) a broken and an empty file."""
    folder.mkdir(parents=True)
    lgg = np.load(source / "data" / "lgg" / "images.npy")
    for i in range(3):
        Image.fromarray(lgg[i]).resize((96, 80)).save(folder / f"good{i}.png")
    if bad:
        (folder / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
        (folder / "empty.png").write_bytes(b"")
    return folder


def test_rule_target_keeps_good_predictions_and_reports_the_bad(workflow_run, tmp_path):
    images = scans(tmp_path / "scans", workflow_run)
    result = snakemake(
        "predict",
        "--configfile",
        str(TINY_CONFIG),
        "--config",
        f"results_dir={workflow_run}",
        f"predict={{input_dir: {images}}}",
        "--cores",
        "2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = workflow_run / "predict"
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("file")
    good = table.loc[["good0.png", "good1.png", "good2.png"]]
    assert good["decision"].isin(["tumor", "no_tumor"]).all() and (good["error"] == "").all()
    assert table.loc["broken.png", "error"] and table.loc["empty.png", "error"]
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["file"]) == ["broken.png", "empty.png"]
    for name in ("good0", "good1", "good2"):
        assert (out / "masks" / f"{name}.png").is_file()
        overlay = Image.open(out / "overlays" / f"{name}.png")
        assert overlay.height > 80  # the image plus the text banner above it
    log = (workflow_run / "logs" / "predict.log").read_text()
    assert "broken.png" in log and "empty.png" in log
    # Models trained on synthetic data say so in the CSV.
    assert table["training_data"].str.startswith("synthetic (").all()


def readme_predict_commands() -> list[str]:
    """The commands of docs/predicting.md's 'Predicting on new images' code block (continued
    lines joined; the README's "Predicting new scans" links there)."""
    text = (REPO / "docs" / "predicting.md").read_text()
    section = text.split("## Predicting on new images", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1].replace("\\\n", " ")
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def model_arguments(results: Path) -> list[str]:
    """--classifiers and --segmenters of the tiny run (backbones and unet folds, by name)."""
    classifiers = sorted(results.glob("classification/*/model.pt"))
    segmenters = sorted(results.glob("segmentation/unet/fold*/model.pt"))
    return ["--classifiers", *classifiers, "--segmenters", *segmenters]


THRESHOLDS = ["--method", "majority", "--classifier-threshold", "0.5"]
THRESHOLDS += ["--segmentation-threshold", "0.5"]


def test_readme_predict_commands_work_after_a_demo(workflow_run, tmp_path):
    """docs/predicting.md's commands as written, with the tiny config and its results standing
    in for config/demo.yaml and results/demo, and this environment's interpreter for .venv/bin/."""
    commands = readme_predict_commands()
    assert len(commands) == 2 and "config/demo.yaml" in commands[0]
    assert "results/demo/segmentation/unet/fold*/model.pt" in commands[1]
    demo = json.loads((workflow_run / "report" / "metrics.json").read_text())["config"]
    assert demo["cascade"]["architecture"] == "unet"  # the architecture the docs name
    images = scans(tmp_path / "scans", workflow_run, bad=False)
    outputs = [workflow_run / "predict" / "predictions.csv", tmp_path / "out" / "predictions.csv"]
    for k, (command, output) in enumerate(zip(commands, outputs, strict=True)):
        output.unlink(missing_ok=True)
        command = (
            command.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
            .replace("config/demo.yaml", str(TINY_CONFIG))
            .replace("results/demo", str(workflow_run))
            .replace("path/to/scans", str(images))
            .replace("scans_out", str(tmp_path / "out"))
        )
        if k == 0:  # the rule target: the tiny run's results_dir stands in for results/demo
            command += f" results_dir={shlex.quote(str(workflow_run))} --cores 2"
        result = subprocess.run(
            command,
            shell=True,
            executable="/bin/bash",
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, (command, result.stderr[-3000:])
        table = pd.read_csv(output)
        assert sorted(table["file"]) == ["good0.png", "good1.png", "good2.png"], command


def test_missing_models_name_the_command_that_trains_them(tmp_path):
    images = tmp_path / "scans"
    images.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(images / "a.png")
    results = tmp_path / "results" / "demo"
    out = tmp_path / "out"
    result = run_script(
        "predict.py",
        "--input-dir",
        images,
        "--classifiers",
        results / "classification" / "resnet10t" / "model.pt",
        "--segmenters",
        results / "segmentation" / "unet" / "fold0" / "model.pt",
        *THRESHOLDS,
        *("--output", out / "p.csv", "--masks-dir", out / "m", "--overlays-dir", out / "o"),
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained model not found" in lines[0] and "resnet10t" in lines[0]
    assert "make demo" in lines[0] and "snakemake --cores all --configfile" in lines[0]


def test_a_skipped_file_exits_1_and_keeps_the_outputs(workflow_run, tmp_path):
    images = scans(tmp_path / "scans", workflow_run)
    out = tmp_path / "out"
    result = run_script(
        "predict.py",
        "--input-dir",
        images,
        *model_arguments(workflow_run),
        *THRESHOLDS,
        "--output",
        out / "p.csv",
        "--masks-dir",
        out / "m",
        "--overlays-dir",
        out / "o",
        "--failures",
        out / "f.csv",
    )
    assert result.returncode == 1  # a file was skipped (the rule passes --allow-skipped)
    assert "2 file(s) could not be read and were skipped: broken.png, empty.png" in result.stderr
    assert len(pd.read_csv(out / "p.csv")) == 5 and len(pd.read_csv(out / "f.csv")) == 2


def test_report_flags_and_paper_note(workflow_run):
    metrics = json.loads((workflow_run / "report" / "metrics.json").read_text())
    checks = metrics["checks"]
    assert set(checks) == {"classification", "segmentation", "paper"}
    assert not checks["paper"]["comparable"] and "synthetic" in checks["paper"]["reasons"][0]
    html = (workflow_run / "report" / "report.html").read_text()
    assert '<h2 id="checks">Checks</h2>' in html and "Not comparable with the paper" in html
    assert "786</td>" in html and "786.000" not in html


def test_volume_rule_keeps_the_good_patients_and_lists_the_broken_one(workflow_run, tmp_path):
    """One unreadable patient among good ones: the predict_volume target exits 0, keeps
    volumes.csv and the good patients' folders, and names the bad one in failures.csv."""
    raw = workflow_run / "raw" / "lgg-mri-segmentation" / "kaggle_3m"
    good = sorted(p for p in raw.iterdir() if p.is_dir())[:2]
    broken = tmp_path / "TCGA_XX_0000_20000101"
    broken.mkdir()
    (broken / "TCGA_XX_0000_20000101_1.tif").write_bytes(b"not a tiff at all")
    (broken / "TCGA_XX_0000_20000101_2.tif").write_bytes(b"")
    volumes = "[" + ", ".join(str(p) for p in [good[0], broken, good[1]]) + "]"
    result = snakemake(
        "predict_volume",
        *("--configfile", str(TINY_CONFIG), "--config", f"results_dir={workflow_run}"),
        f"predict={{volumes: {volumes}}}",
        *("--cores", "2", "--resources", "gpu=1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = workflow_run / "predict_volume"
    table = pd.read_csv(out / "volumes.csv", keep_default_na=False)
    assert table["input"].tolist() == [str(good[0]), str(broken), str(good[1])]
    assert (table["error"] == "").tolist() == [True, False, True]
    kept = sorted(p.name for p in (out / "patients").iterdir() if not p.name.startswith("."))
    assert kept == sorted(p.name for p in good)  # (Snakemake's .snakemake_timestamp aside)
    failures = pd.read_csv(out / "failures.csv")
    assert failures["input"].tolist() == [str(broken)]
    assert "TCGA_XX_0000_20000101_" in failures["error"].iloc[0]
    # The run's ensemble decided: its voters, the segmentation voter with the run's k.
    k = json.loads((workflow_run / "classification/segvoter/min_pixels.json").read_text())
    assert table["voters"].iloc[0].endswith(f"segmentation_voter(k={k['min_pixels']})")
