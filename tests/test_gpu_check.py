"""bench/gpu_check.sh, dry on the CPU at tiny sizes: every step runs, the budget is kept, the
outputs land in $OUT (so the one GPU run does not fail for a silly reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_SIZE": "64",
        "GPU_CHECK_BATCHES": "4 8",
        "GPU_CHECK_CLASSIFIER": "resnet10t",
        "GPU_CHECK_ENCODER": "resnet18",
        "GPU_CHECK_BENCH_ARGS": "--patients 8 --slices-per-patient 6 --images-per-class 4 "
        "--metric-slices 64 --batches 2 --warmup 1 --repeats 1 --threads 1",
        "GPU_CHECK_SNAKEMAKE_ARGS": "-n",
        "GPU_CHECK_COMPILE": "0",  # minutes on the CPU; bench/run_benchmark.py --compile works
        "GPU_CHECK_LOCAL_DIR": str(tmp_path),  # exists; a dry run reads nothing from it
    }
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "bench.json", "bench.md", "bench_host.json", "bench_large.json", "summary.md",
        "workflow.log",
    ]  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert summary.count(": exit 0 after") == 5, summary
    assert "- GPU tests (pytest -m gpu): exit 0 after" in summary  # all skipped without CUDA
    assert "## GPU tests (pytest -m gpu, last 40 lines)" in summary and "skipped" in summary
    bench = json.loads((out / "bench.json").read_text())
    assert bench["data"]["batch_size"] == 4
    assert bench["tasks"]["segmentation"]["model"] == "Unet/resnet18"
    large = json.loads((out / "bench_large.json").read_text())
    assert large["data"]["batch_size"] == 8 and set(large["tasks"]) == set(bench["tasks"])
    host = json.loads((out / "bench_host.json").read_text())
    assert host["tasks"]["classification"]["workflow"]["resident"] is False
    assert "| segmentation | Unet/resnet18 | 8 | host |" in summary
    assert "## Benchmark: host data path (pinned batches) (bench_host.json)" in summary
    assert "train_segmenter" in (out / "workflow.log").read_text()  # the dry run's job list
    assert "torch.compile: skipped (GPU_CHECK_COMPILE=0)" in summary
    assert "## bench_compile.json: not written" in summary
