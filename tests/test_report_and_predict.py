"""The HTML report (escaping, self-contained) and predict on new images."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import TINY_CONFIG, run_script, snakemake
from PIL import Image

from brainmri.reporting.report import esc, table_html

pytestmark = pytest.mark.slow

SCRIPT = "<script>alert(1)</script>"
BACKBONES = yaml.safe_load(TINY_CONFIG.read_text())["classification"]["backbones"]


def report_args(results: Path) -> dict[str, str]:
    """make_report.py's --files and --config as the report rule passes them for the run in
    ``results`` (read from a dry run's shell command)."""
    dry = snakemake(
        "--configfile",
        str(TINY_CONFIG),
        "--config",
        f"results_dir={results}",
        "--dry-run",
        "--printshellcmds",
        "--nolock",
        "--forcerun",
        "report",
        "--",
        str(results / "report" / "report.html"),
    )
    shell = (ln for ln in dry.stdout.splitlines() if ln.startswith("Shell command:"))
    line = next((ln for ln in shell if "make_report.py" in ln), None)
    assert line is not None, dry.stdout[-3000:] + dry.stderr[-3000:]
    words = shlex.split(line)
    return {key: words[words.index(key) + 1] for key in ("--files", "--config")}


def make_report(args: dict[str, str], out: Path, **overrides) -> subprocess.CompletedProcess:
    html, metrics = out / "report.html", out / "metrics.json"
    args = args | overrides
    return run_script("make_report.py", *chain(*args.items()), "--html", html, "--metrics", metrics)


def test_text_from_files_and_config_is_escaped(workflow_run, tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["data"]["local_dir"] = f"/data/{SCRIPT}"
    config["results_dir"] = str(workflow_run)
    args = report_args(workflow_run) | {"--config": json.dumps(config)}
    result = make_report(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    assert SCRIPT not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["data"]["local_dir"].endswith(SCRIPT)
    frame = pd.DataFrame({"id": [f"TCGA_x_{SCRIPT}.tif"], "dice": [0.5]})
    assert SCRIPT not in table_html(frame) and esc(SCRIPT) in table_html(frame)


def test_report_reads_only_its_declared_files(workflow_run, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(workflow_run, results, symlinks=True)
    backbone = BACKBONES[0]
    # Left over from an earlier config: a model folder, a fold and a job's benchmark.
    shutil.copytree(results / "classification" / backbone, results / "classification" / "stray")
    shutil.copytree(
        results / "segmentation" / "unet" / "fold0", results / "segmentation" / "unet" / "fold9"
    )
    (results / "benchmarks" / "stray_job.tsv").write_text("s\tmax_rss\n1.0\t2.0\n")
    args = report_args(results)
    files = json.loads(args["--files"])
    assert "stray" not in args["--files"] and "fold9" not in args["--files"]
    assert set(files["test_metrics"]) == {*BACKBONES, "ensemble"}
    out = tmp_path / "out"
    out.mkdir()
    result = make_report(args, out)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (out / "report.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "stray" not in html and "fold9" not in html
    # Which detector decided (the tiny run: config/config.yaml's majority vote with the voter).
    k = json.loads(Path(files["voter_choice"]).read_text())["min_pixels"]
    detector = f"majority vote of {', '.join(BACKBONES)} + segmentation voter (k={k})"
    assert f"<b>Decided by:</b> {detector}. Its accuracy" in html
    assert f"The ensemble ({detector}) gates the" in html
    assert metrics["decision"]["detector"] == detector and metrics["decision"]["min_pixels"] == k
    assert "stray" not in metrics["classification"] and "stray" not in json.dumps(metrics["checks"])
    # A declared file that is missing: one line naming it, exit 1, no report written.
    missing = Path(files["segmenter_history"]["unet/fold1"])
    missing.unlink()
    failed = tmp_path / "failed"
    failed.mkdir()
    result = make_report(args, failed)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert str(missing) in result.stderr and "missing report input" in result.stderr
    assert not any(failed.iterdir())


def test_predict_on_new_images_reports_broken_files(workflow_run, tmp_path):
    images = tmp_path / "new scans"
    images.mkdir()
    lgg = np.load(workflow_run / "data" / "lgg" / "images.npy")
    Image.fromarray(lgg[0]).resize((256, 256)).save(images / "slice.tif")
    Image.fromarray(lgg[1][..., 1]).save(images / "gray.jpg")
    Image.fromarray((np.random.default_rng(0).random((90, 70)) * 60000).astype(np.uint16)).save(
        images / "sixteen_bit.tif"
    )
    Image.fromarray(np.dstack([lgg[2], np.full((64, 64), 255, np.uint8)]), "RGBA").save(
        images / "rgba.png"
    )
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    result = run_script(
        "predict.py",
        "--input-dir",
        images,
        "--classifiers",
        *(workflow_run / "classification" / b / "model.pt" for b in BACKBONES),
        "--segmenters",
        *(workflow_run / "segmentation" / "unet" / f"fold{k}" / "model.pt" for k in (0, 1)),
        *("--method", "majority", "--classifier-threshold", 0.5),
        *("--segmentation-threshold", 0.5),
        "--output",
        out / "predictions.csv",
        "--masks-dir",
        out / "masks",
        "--overlays-dir",
        out / "overlays",
    )
    assert result.returncode == 1, result.stderr  # the good images are predicted; one skipped
    assert "broken.png" in result.stderr and "1 file(s) could not be read" in result.stderr
    failures = pd.read_csv(out / "failures.csv")  # the default place: beside the CSV
    assert list(failures["file"]) == ["broken.png"] and failures["error"].str.len().gt(0).all()
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("file")
    assert set(table.index) == {
        "slice.tif",
        "gray.jpg",
        "sixteen_bit.tif",
        "rgba.png",
        "broken.png",
    }
    assert table.loc["broken.png", "error"] != ""
    good = table.drop(index="broken.png")
    assert good["decision"].isin(["tumor", "no_tumor"]).all()
    assert good["tumor_probability"].astype(float).between(0, 1).all()
    for name in good.index:
        stem = name.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        original = Image.open(images / name)
        assert mask.shape == (original.height, original.width)  # original size
        assert set(np.unique(mask)) <= {0, 255}
        assert int(good.loc[name, "tumor_area_px"]) == int((mask > 0).sum())
        if good.loc[name, "decision"] == "no_tumor":
            assert not mask.any()
        assert (out / "overlays" / f"{stem}.png").is_file()
