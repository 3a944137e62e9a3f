"""Helpers for tests that run the workflow's scripts or Snakemake itself."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
TINY_CONFIG = REPO / "tests" / "config" / "tiny.yaml"
DEMO_CONFIG = REPO / "config" / "demo.yaml"
FAKE_SECRET = "fake-kaggle-secret-0123456789abcdef"


def run_script(
    name: str, *args, env: dict | None = None, check: bool = False, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``workflow_scripts/<name>`` like a rule does (PYTHONPATH = the repository)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def load_script(name: str):
    """``workflow_scripts/<name>`` imported as a module (its main() not run), to call in-process."""
    spec = importlib.util.spec_from_file_location(Path(name).stem, SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_torch_setup(monkeypatch: pytest.MonkeyPatch, module) -> list[tuple]:
    """Replace ``module``'s select_device, configure_torch and EnsembleModels (where the
    prediction code imports them) with recorders that call through (configure_torch only
    records, leaving this process's global torch flags alone). The returned list gets, in call
    order: ("device", device), ("configure", device, threads), ("models", device)."""
    events: list[tuple] = []
    select_device, models = module.select_device, module.EnsembleModels

    def selected(*args, **kwargs):
        device = select_device(*args, **kwargs)
        events.append(("device", device))
        return device

    def loaded(classifiers, segmenters, rule, device, *args, **kwargs):
        events.append(("models", device))
        return models(classifiers, segmenters, rule, device, *args, **kwargs)

    monkeypatch.setattr(module, "select_device", selected)
    monkeypatch.setattr(module, "configure_torch", lambda *a: events.append(("configure", *a)))
    monkeypatch.setattr(module, "EnsembleModels", loaded)
    return events


def assert_main_configures_torch(
    monkeypatch: pytest.MonkeyPatch, script, argv: list, events: list[tuple]
) -> None:
    """Run ``script.main()`` in-process with ``argv`` and torch at 2 threads (not the test
    process's 1, so a constant 1 fails), then check the recorded order (record_torch_setup):
    device selected, configure_torch(that device, 2), models loaded on that device."""
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    assert events == [("device", device), ("configure", device, 2), ("models", device)]


def snakemake(
    *args: str, env: dict | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess:
    """Run this environment's snakemake on the workflow (from the repository root)."""
    command = [str(Path(sys.executable).parent / "snakemake"), *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_tiny_workflow(
    results: Path, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The whole workflow on tests/config/tiny.yaml into ``results`` (CPU, a few minutes)."""
    return snakemake(
        "--configfile",
        str(TINY_CONFIG),
        "--config",
        f"results_dir={results}",
        "--cores",
        "2",
        "--resources",
        "gpu=1",
        *extra,
        env=env,
    )


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole workflow, run once per session on the tiny config; its results directory.

    Fake Kaggle credentials are set in its environment, to check that they never leak.
    """
    results = tmp_path_factory.mktemp("workflow") / "results"
    result = run_tiny_workflow(
        results, env={"KAGGLE_USERNAME": "leaky-user", "KAGGLE_KEY": FAKE_SECRET}
    )
    if result.returncode != 0:
        raise AssertionError(f"workflow failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    (results.parent / "snakemake.log").write_text(result.stdout + result.stderr)
    return results


def dry_run(tmp_path: Path, *args: str):
    return snakemake("-n", "--cores", "2", *args, "--config", f"results_dir={tmp_path}/results")


def complete_run(*args: str) -> None:
    """Make Snakemake hold the results of ``args`` (--configfile, --config results_dir=...) for
    a complete, up-to-date run without running a job: every planned output as an empty
    placeholder, then `--touch` (in DAG order, recording each job's params as a real run does)."""
    summary = snakemake(*args, "--cores", "1", "--summary")
    assert summary.returncode == 0, summary.stderr[-3000:]
    for line in summary.stdout.splitlines()[1:]:
        path = Path(line.split("\t")[0])
        if path.suffix:  # a file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:  # a directory() output: raw/<dataset>, data/<dataset>/png
            path.mkdir(parents=True, exist_ok=True)
    touched = snakemake(*args, "--cores", "1", "--touch")
    assert touched.returncode == 0, touched.stderr[-3000:]


@pytest.fixture(scope="session")
def completed_demo(tmp_path_factory) -> Path:
    """A folder whose results/ Snakemake holds for a complete, up-to-date demo run (session
    scope, via conftest.py: tests/test_final_model.py uses it too; only dry runs (-n) on it)."""
    tmp_path = tmp_path_factory.mktemp("completed")
    complete_run(
        "--configfile", str(DEMO_CONFIG), "--config", f"results_dir={tmp_path / 'results'}"
    )
    again = dry_run(tmp_path, "--configfile", str(DEMO_CONFIG))
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    return tmp_path
