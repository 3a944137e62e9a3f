"""The workflow as Snakemake sees it, without running a job: lint, dry runs, bad configs, and
the two profiles (profiles/default, the workflow profile, and profiles/slurm)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_CONFIG, complete_run, dry_run, snakemake

DEMO = REPO / "config" / "demo.yaml"
PAPER = REPO / "config" / "config.yaml"
DEFAULT_PROFILE = REPO / "profiles" / "default" / "config.yaml"
SLURM_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = {
    "train_classifier",
    "train_segmenter",
    "evaluate_segmenter",
    "train_segmenter_final",
    "evaluate_segmenter_final",
    "predict_new_images",
    "predict_patient_volumes",
}
LOCAL_RULES = {"fetch", "download_weights", "predict", "predict_volume"}


def job_stats(output: str) -> dict[str, int]:
    """Job counts per rule from the first "Job stats:" table of a Snakemake run."""
    table = output.split("Job stats:", 1)[1].split("\ntotal", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.mark.parametrize("config", [PAPER, DEMO], ids=["paper", "demo"])
def test_lint_is_clean(config):
    result = snakemake("--lint", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "Congratulations, your workflow is in a good condition!" in result.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # 3 pretrained backbones + 1 pretrained encoder (deeplabv3plus/resnet101) to download;
        # 2 architectures x 5 folds.
        (PAPER, {"download_weights": 4, "train_classifier": 3, "train_segmenter": 10,
                 "evaluate_segmenter": 10, "evaluate_classifier": 4, "report": 1}),
        # Nothing pretrained; 2 architectures x 2 folds.
        (DEMO, {"train_classifier": 3, "train_segmenter": 4, "evaluate_segmenter": 4,
                "evaluate_classifier": 4, "segmentation_fold_ensemble": 2, "report": 1}),
    ],
    ids=["paper", "demo"],
)  # fmt: skip
def test_dry_run_resolves_the_whole_dag(tmp_path, config, expected):
    result = dry_run(tmp_path, "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-5000:]
    stats = job_stats(result.stdout + result.stderr)
    for rule, count in expected.items():
        assert stats.get(rule) == count, (rule, stats)
    assert stats.get("fetch") == 2, stats  # one rule, a {dataset} wildcard
    for rule in ("preprocess_lgg", "preprocess_btm", "split", "cascade", "all"):
        assert stats.get(rule) == 1, (rule, stats)
    if "download_weights" not in expected:
        assert "download_weights" not in stats
    assert not (tmp_path / "results").exists(), "a dry run wrote results"


def modified_demo(tmp_path: Path, change) -> Path:
    config = yaml.safe_load(DEMO.read_text())
    change(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


INVALID_CONFIGS = {
    # name: (change to config/demo.yaml, text the error must contain)
    "unknown key": (
        lambda c: c["split"].update(fold=3),
        "split.fold: unknown key (did you mean 'folds'?)",
    ),
    "wrong type": (
        lambda c: c["classification"].update(epochs="ten"),
        "classification.epochs: expected integer, got 'ten'",
    ),
    "unknown backbone": (
        lambda c: c["classification"]["backbones"].append("resnt50"),
        "classification.backbones.resnt50: timm has no model named 'resnt50' "
        "(did you mean 'resnet50'",
    ),
    "renamed size key": (
        lambda c: c["data"].update(image_size=64),
        "data.image_size: renamed to data.array_size",
    ),
    "renamed size key of one model": (
        lambda c: c["segmentation"]["architectures"][0].update(image_size=64),
        "segmentation.unet.image_size: renamed to segmentation.unet.input_size",
    ),
    "more folds than patients": (
        lambda c: c["split"].update(folds=11),
        "split.folds: 11 folds need at least 11 training patients, "
        "but data.synthetic.patients=12 leaves 10",
    ),
}


@pytest.mark.parametrize("name", INVALID_CONFIGS)
def test_invalid_config_fails_the_dry_run_naming_the_key(tmp_path, name):
    change, message = INVALID_CONFIGS[name]
    result = dry_run(tmp_path, "--configfile", str(modified_demo(tmp_path, change)))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-3000:]
    assert "Building DAG of jobs" not in output
    assert not (tmp_path / "results").exists()
    # One line per problem, no schema dump.
    assert "Failed validating" not in output and "On instance" not in output
    assert len(output.splitlines()) < 12, output


def test_every_config_error_is_reported_at_once(tmp_path):
    def change(config):
        config["split"].update(fold=3, level="patients")
        config["classification"].update(epochs="ten", dice_smooth=1.0)

    result = dry_run(tmp_path, "--configfile", str(modified_demo(tmp_path, change)))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "4 configuration errors (keys and defaults: config/schema.yaml):" in output
    for line in (
        "  split.fold: unknown key (did you mean 'folds'?)",
        "  split.level: 'patients' is not one of patient, slice (did you mean 'patient'?)",
        "  classification.epochs: expected integer, got 'ten'",
        "  classification.dice_smooth: unknown key (did you mean 'segmentation.dice_smooth'?)",
    ):
        assert line in output.splitlines(), output


def test_the_valid_demo_copy_passes(tmp_path):
    """The same copy mechanism without a change: the failures above come from the changes."""
    result = dry_run(tmp_path, "--configfile", str(modified_demo(tmp_path, lambda c: None)))
    assert result.returncode == 0, result.stderr[-3000:]


# --- profiles ---------------------------------------------------------------------------------


def rules_text() -> str:
    return "\n".join(path.read_text() for path in sorted((REPO / "rules").glob("*.smk")))


def test_gpu_rules_and_local_rules_are_the_documented_ones():
    text = rules_text()
    gpu = set()
    for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.MULTILINE):
        if re.search(r"^\s+gpu=1,$", body, re.MULTILINE):
            gpu.add(name)
    # `use rule A as B with:` inherits A's resources unless it sets its own.
    for base, name, body in re.findall(
        r"^use rule (\w+) as (\w+) with:\n((?:[ \t]+.*\n|\n)*)", text, re.MULTILINE
    ):
        if base in gpu and "resources:" not in body:
            gpu.add(name)
    assert gpu == GPU_RULES
    local = set()
    for block in re.findall(r"^localrules:\n((?:[ \t]+.*\n)+)", text, re.MULTILINE):
        local.update(re.findall(r"(\w+),", block))
    assert local == LOCAL_RULES


def test_workflow_profile_does_not_shadow_the_slurm_profile():
    """Snakemake reads profiles/default next to --profile profiles/slurm and it wins per key."""
    default = yaml.safe_load(DEFAULT_PROFILE.read_text())
    slurm = yaml.safe_load(SLURM_PROFILE.read_text())
    assert default["cores"] == "all" and default["rerun-incomplete"] is True
    for key in ("default-resources", "set-resources", "set-threads", "resources", "executor"):
        assert key not in default, key
    for key, value in default.items():
        if key in slurm:
            assert slurm[key] == value, f"profiles/default sets {key}={value}, slurm {slurm[key]}"


def test_slurm_profile_uses_only_options_the_plugin_has():
    from snakemake_executor_plugin_slurm import ExecutorSettings

    settings = {"slurm-" + f.name.replace("_", "-") for f in dataclasses.fields(ExecutorSettings)}
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    assert profile["executor"] == "slurm"
    plugin_keys = {key for key in profile if key.startswith("slurm-")}
    assert plugin_keys <= settings, plugin_keys - settings
    assert profile["slurm-status-command"] in {"sacct", "squeue"}
    defaults = profile["default-resources"]
    assert {"slurm_partition", "slurm_account", "runtime", "mem_mb", "cpus_per_task"} <= set(
        defaults
    )
    # Every GPU rule has its knobs; a GPU is asked for with gpu/gpu_model, never with gres.
    # Runtime and memory of a rule are set in one place, the rule, not here as well.
    assert set(profile["set-resources"]) == GPU_RULES
    for rule, resources in profile["set-resources"].items():
        assert set(resources) == {"slurm_partition", "gpu_model"}, rule
    for resources in [defaults, *profile["set-resources"].values()]:
        assert "gres" not in resources


def test_slurm_profile_dry_run_gives_gpu_rules_a_gpu(tmp_path):
    result = snakemake(
        "-n", "--profile", "profiles/slurm", "--configfile", str(DEMO),
        "--config", f"results_dir={tmp_path}/results",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    output = result.stdout + result.stderr
    assert "profiles/slurm and workflow specific profile profiles/default" in output
    jobs = re.findall(r"^rule (\w+):\n(.*?)(?=^\[|\Z)", output, re.MULTILINE | re.DOTALL)
    seen = set()
    for rule, body in jobs:
        resources = re.search(r"^\s+resources: (.*)$", body, re.MULTILINE)
        if resources is None:
            continue
        resources = resources[1]
        seen.add(rule)
        assert ("gpu=1" in resources.split(", ")) == (rule in GPU_RULES), (rule, resources)
        assert "gres" not in resources
        assert "runtime=" in resources and "mem_mb=" in resources, (rule, resources)
        if rule == "train_classifier":
            assert "runtime=240" in resources and "mem_mb=16000" in resources
    assert {"train_classifier", "train_segmenter", "evaluate_segmenter", "split"} <= seen


# --- a training job stopped by SIGTERM: its lost outputs are redone with what depends on them ---


def test_a_model_lost_by_a_stopped_job_is_retrained_with_everything_downstream(tmp_path):
    """Snakemake deletes the outputs of a failed (e.g. SIGTERM-ed) training job. The next plain
    run must train it again (resuming) and redo the results computed from the old model,
    instead of "Nothing to be done" under a stale report."""
    args = ("--configfile", str(TINY_CONFIG), "--config", f"results_dir={tmp_path}/results")
    complete_run(*args)
    control = snakemake("-n", "--cores", "1", *args)
    assert "Nothing to be done" in control.stdout + control.stderr, control.stderr[-3000:]

    model = tmp_path / "results" / "classification" / "resnet10t"
    for name in ("model.pt", "history.csv", "test_predictions.csv"):
        (model / name).unlink()
    result = snakemake("-n", "--cores", "1", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = job_stats(result.stdout + result.stderr)
    assert stats.get("train_classifier") == 1, stats
    # Its evaluation, the ensemble, the ensemble's evaluation, the cascade and the report.
    assert stats.get("evaluate_classifier") == 2 and stats.get("ensemble_classifiers") == 1
    assert stats.get("cascade") == 1 and stats.get("report") == 1, stats
    assert "train_segmenter" not in stats and "preprocess_lgg" not in stats, stats


# --- targets after --resources --------------------------------------------------------------


def documented_commands() -> list[tuple[str, str]]:
    """(where, line) of every command line in README.md, docs/*.md (code blocks) and Makefile."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        inside = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                inside = not inside
            elif inside:
                found.append((f"{path.name}:{number}", line.split(" # ")[0]))
    for number, line in enumerate((REPO / "Makefile").read_text().splitlines(), 1):
        if line.startswith("\t"):
            found.append((f"Makefile:{number}", line))
    return found


def test_documented_targets_after_resources_follow_a_double_dash():
    """`--resources` takes several values: a target right after it is read as a resource."""
    commands = documented_commands()
    assert any("--resources gpu=1 -- results/" in line for _, line in commands)
    for where, line in commands:
        for match in re.finditer(r"--resources((?:\s+\w+=\S+)+)\s+(\S+)", line):
            assert match[2].startswith("-"), f"{where}: target after --resources without --"


def test_the_double_dash_form_runs_and_the_bare_form_fails(tmp_path):
    target = f"{tmp_path}/results/splits/splits.csv"
    base = ("-n", "--configfile", str(TINY_CONFIG), "--config", f"results_dir={tmp_path}/results")
    bare = snakemake(*base, "--cores", "1", "--resources", "gpu=1", target)
    assert bare.returncode != 0 and "ValueError" in bare.stderr, bare.stderr[-2000:]
    good = snakemake(*base, "--cores", "1", "--resources", "gpu=1", "--", target)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "split" in job_stats(good.stdout + good.stderr)


# --- evaluation settings rerun evaluation only ----------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # 2 architectures x 2 folds evaluated again; no training. The segmentation voter
        # (on in config/config.yaml) changes with it, and so do the vote and its evaluation.
        ("segmentation", {"evaluate_segmenter": 4, "segmentation_fold_ensemble": 2,
                          "summarize_segmentation": 1, "cascade": 1, "report": 1, "all": 1,
                          "segmentation_voter": 1, "ensemble_classifiers": 1,
                          "evaluate_classifier": 1}),
        # 3 backbones + the ensemble evaluated again, the vote redone; no training.
        ("classification", {"ensemble_classifiers": 1, "evaluate_classifier": 4, "cascade": 1,
                            "report": 1, "all": 1}),
    ],
)  # fmt: skip
def test_changing_a_threshold_reruns_evaluation_only(completed_demo, tmp_path, key, expected):
    changed = modified_demo(tmp_path, lambda c: c[key].update(threshold=0.4))
    result = dry_run(completed_demo, "--configfile", str(changed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert job_stats(result.stdout + result.stderr) == expected


def test_a_predict_override_on_the_default_target_schedules_nothing(completed_demo, tmp_path):
    """The report's params hold only the config it shows (rules/common.smk report_config): a
    `predict=` or `gpu_jobs_per_device=` override leaves the finished run alone, while a change
    the report does show (the seed) reruns it (the control)."""
    base = ("-n", "--cores", "2", "--configfile", str(DEMO), "--config")
    results = f"results_dir={completed_demo}/results"
    override = snakemake(
        *base, results, f"predict={{input_dir: {tmp_path}}}", "gpu_jobs_per_device=2"
    )
    assert override.returncode == 0, override.stderr[-3000:]
    assert "Nothing to be done" in override.stdout + override.stderr, override.stdout[-3000:]
    control = snakemake(*base, results, "recipe=changed")
    assert control.returncode == 0, control.stderr[-3000:]
    assert job_stats(control.stdout + control.stderr) == {"report": 1, "all": 1}
