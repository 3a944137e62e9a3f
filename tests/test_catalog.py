"""Snakemake workflow catalog conventions: the catalog's usage file, config/README.md, Snakemake's
own --report from a finished run, and this workflow used as a module by another workflow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_CONFIG, snakemake

CATALOG = REPO / ".snakemake-workflow-catalog.yml"
CONFIG_README = REPO / "config" / "README.md"


def test_catalog_file_is_valid_yaml_with_the_required_keys():
    usage = yaml.safe_load(CATALOG.read_text())["usage"]
    assert set(usage) == {"mandatory-flags", "software-stack-deployment", "report"}
    flags = usage["mandatory-flags"]
    assert set(flags) == {"desc", "flags"} and flags["desc"].strip()
    assert "--resources gpu=" in flags["flags"]
    stack = usage["software-stack-deployment"]
    assert set(stack) <= {"conda", "apptainer", "apptainer+conda", "singularity"}
    assert all(isinstance(value, bool) for value in stack.values())
    assert stack["conda"] is True  # envs/*.yaml, one per rule group (tests/test_envs.py)
    assert usage["report"] is True  # Snakefile's report: statement (test below)


def test_config_readme_describes_every_file_and_key():
    """Every config file, every top-level key group and every key of the schema is named."""
    text = CONFIG_README.read_text()
    for path in sorted((REPO / "config").glob("*.yaml")):
        assert f"`{path.name}`" in text, path.name
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    missing = []
    for group, spec in schema["properties"].items():
        names = [group, *spec.get("properties", {})]
        for sub in spec.get("properties", {}).values():
            names += list(sub.get("properties", {})) if isinstance(sub, dict) else []
        missing += [name for name in names if f"`{name}`" not in text]
    assert missing == []


def module_workflow(folder: Path) -> Path:
    """Another project's workflow that deploys this one as a module (docs/running.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    snippet = (REPO / "docs" / "running.md").read_text().split("<!-- module:begin -->")[1]
    snippet = snippet.split("<!-- module:end -->")[0]
    code = re.search(r"```python\n(.*?)```", snippet, re.DOTALL)[1]
    assert 'snakefile: "path/to/brain-mri/Snakefile"' in code
    code = code.replace("path/to/brain-mri/Snakefile", str(REPO / "Snakefile"))
    (folder / "Snakefile").write_text(code)
    config = yaml.safe_load(TINY_CONFIG.read_text()) | {"results_dir": "results"}
    (folder / "config").mkdir(exist_ok=True)
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_the_workflow_runs_as_a_module_of_another_workflow(tmp_path):
    """A dry run of the documented module deployment, from the other project's folder: every
    stage is planned, its outputs land in that folder, and scripts and envs come from here."""
    folder = module_workflow(tmp_path / "project")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "-p", "--cores", "2"],
        cwd=folder, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for rule in ("fetch", "train_classifier", "train_segmenter", "cascade", "report", "all"):
        assert re.search(rf"^{rule}\s+\d+$", output, re.MULTILINE), rule
    assert "results/report/report.html" in output
    assert f"SCRIPTS={REPO / 'workflow_scripts'}" in output or str(REPO) in output


@pytest.mark.slow
def test_snakemake_report_from_the_finished_run(workflow_run):
    """`snakemake --report` (the catalog's `report: true`) from the session's tiny run."""
    html = workflow_run / "report" / "snakemake_report.html"
    result = snakemake(
        "--configfile", str(TINY_CONFIG), "--config", f"results_dir={workflow_run}",
        "--report", str(html),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and len(page) > 100_000
    for category in ("Segmentation", "Cascade", "Report"):  # report() categories of the rules
        assert category in page, category
