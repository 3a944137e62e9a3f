"""Training jobs killed mid-run (SIGKILL, SIGTERM) resume and end bit-identical on the CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import REPO, SCRIPTS

SETTINGS = {
    "backbone": "resnet10t",
    "name": "resnet10t",
    "pretrained": False,
    "input_size": 64,
    "epochs": 4,
    "batch_size": 16,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "patience": None,
    "augment": {"rotation_deg": 10, "shift_fraction": 0.05, "hflip": True, "vflip": True},
}


def command(data, out):
    return [
        sys.executable,
        str(SCRIPTS / "train.py"),
        "classification",
        "--settings",
        json.dumps(SETTINGS),
        "--manifest",
        str(data.manifest),
        "--splits",
        str(data.splits),
        "--images",
        f"lgg={data.lgg_images}",
        f"btm={data.btm_images}",
        "--seed",
        "3",
        "--threads",
        "1",
        "--checkpoint",
        str(out / "model.pt"),
        "--history",
        str(out / "history.csv"),
        "--predictions",
        str(out / "test.csv"),
        "--device-json",
        str(out / "device.json"),
    ]


def run(data, out, env) -> subprocess.CompletedProcess:
    return subprocess.run(command(data, out), capture_output=True, text=True, env=env, timeout=600)


def interrupt_after_first_epoch(data, out, env, sig) -> int:
    process = subprocess.Popen(
        command(data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = out / "resume" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be interrupted"
    time.sleep(0.3)  # into the next epoch
    process.send_signal(sig)
    return process.wait(timeout=120)


def assert_same_result(a, b) -> None:
    first, second = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert first["epoch"] == second["epoch"]
    for key, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][key]), key
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "best"]
    pd.testing.assert_frame_equal(
        pd.read_csv(a / "history.csv")[columns], pd.read_csv(b / "history.csv")[columns]
    )
    assert (a / "test.csv").read_text() == (b / "test.csv").read_text()


@pytest.fixture(scope="module")
def uninterrupted(preprocessed_data, tmp_path_factory, env):
    out = tmp_path_factory.mktemp("straight")
    result = run(preprocessed_data, out, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "resume").exists()
    return out


@pytest.fixture(scope="module")
def env():
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_job_resumes_to_the_same_result(
    preprocessed_data, uninterrupted, tmp_path, env, sig
):
    code = interrupt_after_first_epoch(preprocessed_data, tmp_path, env, sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    assert not (tmp_path / "model.pt").exists()  # nothing that looks complete
    result = run(preprocessed_data, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming after epoch" in result.stderr
    assert_same_result(uninterrupted, tmp_path)


def test_corrupted_state_falls_back_with_a_warning(preprocessed_data, uninterrupted, tmp_path, env):
    interrupt_after_first_epoch(preprocessed_data, tmp_path, env, signal.SIGKILL)
    state = tmp_path / "resume" / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 3])
    result = run(preprocessed_data, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ignoring the resume state" in result.stderr
    assert_same_result(uninterrupted, tmp_path)


def test_outputs_of_a_classifier_run(preprocessed_data, uninterrupted):
    history = pd.read_csv(uninterrupted / "history.csv")
    assert list(history.columns) == [
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "seconds",
        "best",
    ]
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    predictions = pd.read_csv(uninterrupted / "test.csv")
    assert list(predictions.columns) == ["id", "patient", "label", "prob_tumor"]  # no decision
    manifest = pd.read_csv(preprocessed_data.manifest, keep_default_na=False)
    splits = pd.read_csv(preprocessed_data.splits, keep_default_na=False)
    test = manifest.merge(splits, on="id").query("cls_split == 'test'")
    assert predictions["id"].tolist() == test["id"].tolist()
    assert predictions["label"].tolist() == test["has_tumor"].tolist()
    assert predictions["prob_tumor"].between(0, 1).all()
    device = json.loads((uninterrupted / "device.json").read_text())
    assert device["type"] == "cpu" and device["torch"] == torch.__version__
    checkpoint = torch.load(uninterrupted / "model.pt", weights_only=True)
    assert (
        checkpoint["format"] == "brainmri-checkpoint-v2" and checkpoint["task"] == "classification"
    )
    assert checkpoint["val_loss"] == pytest.approx(history["val_loss"].min())


# --- the whole Snakemake run killed: rerunning the same command resumes ---------------------


@pytest.mark.slow
def test_killed_snakemake_run_resumes_when_the_same_command_is_rerun(tmp_path):
    """kill -9 of Snakemake's whole process group (a closed terminal, a lost node): Snakemake's
    lock stays behind. The documented recovery is to rerun the same command: it removes the
    stale lock itself and training resumes from its last completed epoch (README)."""
    import os

    from helpers import TINY_CONFIG

    results = tmp_path / "results"
    model = results / "classification" / "resnet10t"
    longer = tmp_path / "longer.yaml"
    longer.write_text("classification: {epochs: 3, patience: null}\n")  # 1 done, 2 resumed
    # Its own working directory (.snakemake/ and its locks): the stale lock is removed only
    # when no other run of the workflow is alive there, and the suite's other Snakemake runs
    # (pytest-xdist workers) use the repository's.
    workdir = tmp_path / "workdir"
    command = [
        str(Path(sys.executable).parent / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(TINY_CONFIG),
        str(longer),
        "--config",
        f"results_dir={results}",
        "--cores",
        "2",
        str(model / "model.pt"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state = model / "resume" / "state.pt"
    deadline = time.monotonic() + 600
    while not state.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.1)
    assert run.poll() is None, "the run ended before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert not (model / "model.pt").exists()
    locks = workdir / ".snakemake" / "locks"
    assert any(str(results) in p.read_text() for p in locks.glob("*.lock")), "no stale lock"

    rerun = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )  # the same command, as README says
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-4000:]
    assert "Removed the lock of a killed Snakemake run" in output
    log = (results / "logs" / "classification" / "resnet10t.log").read_text()
    assert "Resuming after epoch" in log, log[-3000:]
    history = pd.read_csv(model / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert not (model / "resume").exists()
