"""The performance benchmark: a tiny end-to-end run of the CLI and its building blocks."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
import torch
from helpers import run_script

from bench.benchmark import Phase, format_markdown, median_of, metric_inputs, run_scaling, timed
from brainmri.evaluation.segmentation import slice_cases

TINY = [
    "--classifier", "resnet10t", "--batch-size", "4", "--warmup", "1",
    "--batches", "2", "--repeats", "2", "--threads", "1", "--device", "cpu", "--patients", "8",
    "--slices-per-patient", "6", "--images-per-class", "4", "--metric-slices", "64",
]  # fmt: skip


BENCH = "../bench/run_benchmark.py"  # run_script runs workflow_scripts/<name>


def _positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_script(
        BENCH,
        "--output",
        out / "bench.md",
        *TINY,
        "--image-size",
        "64",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, json.loads((out / "bench.json").read_text())


def test_report_fields_are_finite_and_positive(tiny_report):
    _, _, report = tiny_report
    assert report["machine"]["device"] == "cpu"
    assert report["machine"]["torch"] == torch.__version__
    # the code measured, for make figures' commit column (tools/readme_figures.py)
    assert re.fullmatch(r"[0-9a-f]{40}( \(with uncommitted changes\))?", report["git_commit"])
    assert set(report["tasks"]) == {"classification", "segmentation"}
    assert report["tasks"]["classification"]["model"] == "resnet10t"
    assert report["tasks"]["segmentation"]["model"] == "Unet/resnet18"
    for entry in report["tasks"].values():
        limit, flow, naive = entry["limit"], entry["workflow"], entry["naive"]
        for value in (
            limit["train_ips"],
            limit["infer_ips"],
            flow["train_ips"],
            flow["epoch_ips"],
            flow["infer_ips"],
            naive["train_ips"],
            entry["train_ratio"],
            entry["infer_ratio"],
            entry["speedup_vs_naive"],
        ):
            assert _positive(value)
        assert limit["train_ips"] == pytest.approx(
            float(np.median([one["limit"]["train_ips"] for one in entry["rounds"]]))
        )
        # two rounds, each with its own ratio; the reported ratio is their median
        assert len(entry["rounds"]) == 2
        ratios = [one["train_ratio"] for one in entry["rounds"]]
        assert entry["train_ratio"] == pytest.approx(float(np.median(ratios)))
        assert entry["train_ratio_range"] == [min(ratios), max(ratios)]
        for one in entry["rounds"]:
            assert one["train_ratio"] == pytest.approx(
                one["workflow"]["train_ips"] / one["limit"]["train_ips"]
            )
        # exactly the timed batches went through fit(): 2 batches of 4 images
        assert flow["train_images"] == 8
        assert flow["val_images"] >= 4
        for parts in [one["workflow"]["breakdown"] for one in entry["rounds"]]:
            assert all(parts[key] >= 0 for key in parts)
            assert _positive(parts["step_s"])
            loop = parts["data_load_s"] + parts["augment_s"] + parts["step_s"]
            assert parts["data_share"] == pytest.approx((loop - parts["step_s"]) / loop)
            parts_sum = ("data_load_s", "augment_s", "step_s", "eval_s", "other_s")
            # the parts add up to the epoch time fit() recorded (rounded to ms)
            assert sum(parts[k] for k in parts_sum) == pytest.approx(parts["epoch_s"], abs=5e-3)
    pre = report["preprocessing"]
    assert pre["slices"] == report["data"]["timings"]["lgg_slices"] > 0
    assert _positive(pre["slices_per_s"])
    metrics = report["metrics"]
    assert metrics["slices"] == 64
    assert metrics["nonempty_pairs"] > 0
    for key in ("overlap", "distance_1", "distance_n", "per_slice"):
        assert _positive(metrics[f"{key}_per_s"])


def test_markdown_written_and_printed(tiny_report):
    out, result, report = tiny_report
    text = (out / "bench.md").read_text()
    assert text == result.stdout
    assert "| classification | resnet10t |" in text
    assert "| segmentation | Unet/resnet18 |" in text
    assert "AMD" in text or report["machine"]["cpu"] in text
    assert "LGG preprocessing" in text
    assert not list(out.glob(".*tmp"))  # atomic writes left no temporaries


def test_existing_data_dir(preprocessed_data, tmp_path):
    """--data-dir: the workflow's data folder as is (64 px); preprocessing timed on raw/."""
    output = tmp_path / "bench.md"
    result = run_script(
        BENCH, "--output", output, *TINY, "--data-dir", preprocessed_data.data_dir,
        "--tasks", "classification", "--no-naive", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.with_suffix(".json").read_text())
    assert report["data"]["image_size"] == report["data"]["array_size"] == 64
    assert report["data"]["source"] == str(preprocessed_data.data_dir)
    assert list(report["tasks"]) == ["classification"]
    assert "naive" not in report["tasks"]["classification"]
    lgg_rows = sum(
        1 for line in preprocessed_data.manifest.read_text().splitlines() if ",lgg," in line
    )
    assert report["preprocessing"]["slices"] == lgg_rows
    assert _positive(report["preprocessing"]["slices_per_s"])


def test_missing_data_dir_is_a_clear_error(tmp_path):
    output = tmp_path / "bench.md"
    result = run_script(
        BENCH,
        "--output",
        output,
        "--data-dir",
        tmp_path / "nowhere",
        "--device",
        "cpu",
    )
    assert result.returncode == 1
    assert "nowhere/manifest.csv: not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists() and not output.with_suffix(".json").exists()


def test_timed_counts_batches_and_time_spent_producing_them():
    def slow_batches():
        for _ in range(3):
            time.sleep(0.02)
            yield torch.zeros(5, 3, 2, 2), torch.zeros(5)

    phase = Phase()
    for _ in timed(slow_batches(), phase, torch.device("cpu")):
        time.sleep(0.01)  # the "step"
    assert (phase.batches, phase.images) == (3, 15)
    assert phase.data >= 0.06
    assert phase.seconds >= phase.data + 0.03


def test_metric_inputs_cover_every_empty_mask_case():
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[1, 4:9, 4:9] = 1
    masks[2, 8:12, 2:6] = 1
    pred, truth = metric_inputs(masks, 30)
    assert pred.shape == truth.shape == (30, 16, 16)
    assert np.array_equal(truth[4:8], masks.astype(bool))  # tiled
    cases = slice_cases(pred, truth)
    assert set(cases) == {"both_empty", "pred_empty_only", "truth_empty_only", "both_nonempty"}
    # non-trivial distances: predictions differ from the truth
    assert (pred != truth).any()


def test_format_markdown_scaling_table():
    report = {
        "scaling_cores": 2,
        "scaling": [
            {"patients": 10, "lgg_slices": 170, "images": 218, "data_s": 20.5},
            {"patients": 20, "lgg_slices": 340, "images": 388, "data_s": 31.25},
        ],
    }
    text = format_markdown(report)
    assert "| 10 | 170 | 218 | 20.5 |" in text
    assert "| 20 | 340 | 388 | 31.2 |" in text
    assert "whole demo" not in text
    report["scaling"][0].update(rest_s=60.0, full_s=80.5)
    assert "| 10 | 170 | 218 | 20.5 | 60.0 | 80.5 |" in format_markdown(report)


def test_scaling_rejects_bad_arguments(tmp_path):
    with pytest.raises(Exception, match="config file not found"):
        run_scaling([10], False, 1, tmp_path / "missing.yaml")
    config = tmp_path / "demo.yaml"
    config.write_text("results_dir: x\n")
    with pytest.raises(ValueError, match="positive"):
        run_scaling([0], False, 1, config)


def test_median_of_takes_the_median_of_every_number_and_keeps_the_rest():
    rounds = [
        {"ips": 10.0, "images": 8, "name": "a", "parts": {"step_s": 3.0}},
        {"ips": 30.0, "images": 8, "name": "b", "parts": {"step_s": 1.0}},
        {"ips": 20.0, "images": 8, "name": "c", "parts": {"step_s": 2.0}},
    ]
    assert median_of(rounds) == {"ips": 20.0, "images": 8, "name": "a", "parts": {"step_s": 2.0}}


def test_the_limit_and_the_workflow_loop_are_synchronised_alike(monkeypatch):
    """Item 9: both loops synchronise before and after every step / batch (before: only the
    workflow's batches were, which biased the ratios against the workflow on a GPU)."""
    from bench import benchmark

    calls = []
    monkeypatch.setattr(benchmark, "_sync", lambda device: calls.append("sync"))
    benchmark._time_loop(lambda: calls.append("step"), torch.device("cpu"), 1, 3)
    limit = calls[calls.index("step", 1) :]  # after the warm-up step
    calls.clear()
    phase = Phase()
    batches = [(torch.zeros(1), None)] * 3
    for _ in timed(batches, phase, torch.device("cpu")):
        calls.append("step")
    assert limit.count("step") == calls.count("step") == 3
    for trace in (limit, calls):
        steps = [i for i, c in enumerate(trace) if c == "step"]
        assert all(trace[i - 1] == "sync" for i in steps)  # a sync right before every step


def test_the_limit_compiles_in_its_own_cache_when_the_plan_compiles(monkeypatch):
    """Item 9: with --compile the limit and the workflow compile alike, each model into a fresh
    dynamo cache (before: one cache for every model, silently falling back to eager)."""
    from bench import benchmark
    from brainmri.accelerator import AcceleratorPlan

    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset()))
    settings = {
        "backbone": "resnet10t", "pretrained": False, "input_size": 32, "batch_size": 2,
        "lr": 1e-3, "augment": {},
    }  # fmt: skip
    cpu = torch.device("cpu")
    plan = AcceleratorPlan(device=cpu, compile=True, compile_backend="eager", eval_batch=2)
    from torch._dynamo.utils import counters

    before = int(counters["frames"]["ok"])
    result = benchmark.limit_throughput("classification", settings, cpu, 1, 1, 0, plan)
    assert resets and int(counters["frames"]["ok"]) > before  # compiled, in a fresh cache
    assert result["train_ips"] > 0 and result["infer_ips"] > 0
    eager = benchmark.fp32_eager_plan(cpu, 2)
    assert not eager.compile and eager.precision == "fp32" and not eager.channels_last


def test_the_process_clock_counts_cpu_seconds_not_waiting():
    from bench import benchmark

    try:
        benchmark.use_clock("process")
        phase = Phase()
        for _ in timed([(torch.zeros(1), None)], phase, torch.device("cpu")):
            time.sleep(0.2)  # waiting (another job's turn on a shared machine) costs no CPU
        assert phase.seconds < 0.1
    finally:
        benchmark.use_clock("wall")
