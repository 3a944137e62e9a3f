"""The workflow through profiles/slurm on a real one-node SLURM cluster (tests/slurm_cluster.py).

The tiny workflow runs once locally (helpers.workflow_run, shared with test_workflow_run.py) and
once through `--profile <copy of profiles/slurm>`, with only what this cluster needs changed:
its partition, small memory requests, `squeue` as the status command (it has no accounting),
2 threads per job (the local run's `--cores 2`; the node may have no more CPUs), fast status
checks, and kept SLURM logs in the test's folder. Then: every non-local job went through sbatch
and completed, the GPU rules asked for a GPU, and the results equal the local run's.

Skipped where the cluster cannot start (not root, packages missing), except under CI=true.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_CONFIG, snakemake, workflow_run  # noqa: F401
from slurm_cluster import DEBIAN_PACKAGES, ClusterUnavailable, parse_scontrol_line, start_cluster

SLURM_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = {"train_classifier", "train_segmenter", "evaluate_segmenter", "predict_new_images"}
LOCAL_RULES = {"fetch", "all"}
THREADS = 2


@pytest.fixture
def slurm_cluster():
    try:
        cluster = start_cluster()
    except ClusterUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM test cluster did not start under CI: {error}")
        pytest.skip(f"no SLURM test cluster: {str(error).splitlines()[0]}")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_parse_scontrol_line():
    line = (
        "JobId=7 JobName=a b JobState=COMPLETED Comment=rule_x_wildcards_fold=1 "
        "TresPerJob=gres:gpu:1 AllocNode:Sid=vm:12"
    )
    assert parse_scontrol_line(line) == {
        "JobId": "7",
        "JobName": "a b",
        "JobState": "COMPLETED",
        "Comment": "rule_x_wildcards_fold=1",
        "TresPerJob": "gres:gpu:1",
        "AllocNode:Sid": "vm:12",
    }


def test_ci_installs_what_the_cluster_needs():
    script = (REPO / ".ci" / "run").read_text()
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    assert "set -euo pipefail" in script and "\nexec make test\n" in script
    packages = re.search(r"SLURM_PACKAGES=\(([^)]*)\)", script)[1].split()
    assert sorted(packages) == sorted(DEBIAN_PACKAGES.split())


def cluster_profile(folder: Path, partition: str) -> Path:
    """profiles/slurm with what a one-node test cluster without accounting needs changed."""
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    profile["default-resources"].update(slurm_partition=partition, mem_mb=1000)
    for resources in profile["set-resources"].values():
        resources.update(slurm_partition=partition, mem_mb=1000)
    profile.update(
        {
            "max-threads": THREADS,
            "slurm-status-command": "squeue",
            "slurm-init-seconds-before-status-checks": 2,
            "slurm-logdir": str(folder / "slurm_logs"),
            "slurm-keep-successful-logs": True,
        }
    )
    (folder / "profile").mkdir(parents=True)
    (folder / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder / "profile"


def job_stats(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1].split("\ntotal", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def comparable(results: Path) -> dict[str, object]:
    """The files that must be identical: splits, predictions, every metrics JSON."""
    files: dict[str, object] = {}
    for path in sorted(results.rglob("*")):
        name = str(path.relative_to(results))
        if name == "report/metrics.json":
            data = json.loads(path.read_text())
            data.pop("provenance")  # date, git state
            data["config"].pop("results_dir")
            files[name] = data
        elif (
            path.suffix == ".json"
            or name == "splits/splits.csv"
            or name.endswith("test_predictions.csv")
            or name.endswith("per_slice.csv")
        ):
            files[name] = path.read_text()
    return files


@pytest.mark.slurm
@pytest.mark.slow
def test_workflow_through_slurm_equals_local_run(workflow_run, slurm_cluster, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    results = tmp_path / "results"
    profile = cluster_profile(tmp_path, cluster.partition)
    run = snakemake(
        "--profile", str(profile), "--configfile", str(TINY_CONFIG),
        "--config", f"results_dir={results}",
        env=cluster.env,
    )  # fmt: skip
    output = run.stdout + run.stderr
    (tmp_path / "snakemake.log").write_text(output)
    assert run.returncode == 0, output[-6000:] + "\n" + cluster.log_tail()
    assert "Using profiles" in output and "profiles/default" in output

    # Every job but the local ones went through sbatch, on the given partition, and completed.
    planned = job_stats(output)
    submitted: dict[str, list[dict[str, str]]] = {}
    for job in cluster.jobs():
        match = re.fullmatch(r"rule_(.+?)(?:_wildcards_(.*))?", job["Comment"])
        assert match, job["Comment"]
        submitted.setdefault(match[1], []).append(job)
    expected = {rule: n for rule, n in planned.items() if rule not in LOCAL_RULES}
    assert {rule: len(jobs) for rule, jobs in submitted.items()} == expected
    assert {"train_classifier", "train_segmenter", "evaluate_segmenter"} <= set(submitted)
    assert not LOCAL_RULES & set(submitted)
    for rule, jobs in submitted.items():
        for job in jobs:
            assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
            assert job["Partition"] == cluster.partition
            assert job["WorkDir"] == str(REPO)
            # The GPU rules' `gpu=1` became `sbatch --gpus=1`; no other job asked for a GPU.
            gpus = job.get("TresPerJob", "")
            assert (gpus == "gres:gpu:1") == (rule in GPU_RULES), (rule, gpus)
            if rule in {"train_classifier", "train_segmenter"}:
                assert job["CPUs/Task"] == str(THREADS) and job["MinMemoryNode"] == "1000M"
    # The plugin's SLURM log of each training job: the job-level Snakemake ran the rule there.
    for job in submitted["train_classifier"]:
        logs = list(
            (tmp_path / "slurm_logs" / "rule_train_classifier").rglob(f"{job['JobId']}.log")
        )
        assert len(logs) == 1, job["JobId"]
        assert "rule train_classifier:" in logs[0].read_text()

    # Same inputs, same seed, same threads: the same numbers as the local run.
    local, remote = comparable(workflow_run), comparable(results)
    assert "splits/splits.csv" in remote and "report/metrics.json" in remote
    assert sum(name.endswith("_metrics.json") for name in remote) >= 10
    assert sorted(remote) == sorted(local)
    differing = [name for name in local if local[name] != remote[name]]
    assert not differing, f"SLURM and local results differ: {differing}"
