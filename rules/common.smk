"""Shared helpers: config validation, pre-flight checks, paths, and target lists."""

import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version, validate

min_version("9.0")

# This repository (rules/..): the workflow's package (brainmri/), scripts and schema. Not
# workflow.basedir, which is the directory of the user's Snakefile when this workflow is used
# as a module (docs/running.md, "As a Snakemake module").
REPO = Path(workflow.current_basedir).parent
sys.path.insert(0, str(REPO))
import yaml
from brainmri.config import (
    check_config,
    check_renamed_keys,
    model_names,
    preflight,
    training_settings,
)
from brainmri.data.limits import Limits, volume_memory_mb
from brainmri.runlock import claim_workdir, held_locks

# A renamed key first (it names the new one); then every schema violation at once, one line
# each with did-you-mean hints; then Snakemake's validate (which then passes) fills in the
# defaults.
check_renamed_keys(config)
SCHEMA = REPO / "config" / "schema.yaml"
check_config(config, yaml.safe_load(SCHEMA.read_text()))
validate(config, schema="../config/schema.yaml", set_default=True)
# Cross-key checks (they import timm and smp: seconds) once, in the main process; the jobs
# of a cluster run, which read the workflow again, skip them.
if workflow.is_main_process:
    preflight(config)
    # A killed run's lock: removed when no other run of this workflow is alive here
    # (brainmri/runlock.py), so that rerunning the same command resumes (README, reliability).
    _LIVE, _STALE, _OTHERS = claim_workdir(".snakemake")
    if _STALE:
        print(
            "Removed the lock of a killed Snakemake run (.snakemake/locks; no other run of "
            "this workflow is alive here): its unfinished jobs are redone, training resumes "
            "from its last completed epoch.",
            file=sys.stderr,
        )
    elif _OTHERS and held_locks(".snakemake"):
        print(
            "Note: another Snakemake run of this workflow is alive in this folder. If it "
            "writes the same files, Snakemake stops with LockException: wait for it or stop "
            "it, then rerun (do not --unlock a live run).",
            file=sys.stderr,
        )

RESULTS = Path(config["results_dir"])
WEIGHTS = Path(config["weights_dir"])
SCRIPTS = REPO / "workflow_scripts"
PACKAGE = REPO / "brainmri"
# Scripts import brainmri from the repository, also inside conda envs (--sdm conda). Without
# conda they run with the interpreter that runs Snakemake (e.g. .venv/bin/python).
_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
_INTERPRETER = "python" if _CONDA else sys.executable


def _shell_literal(text: str) -> str:
    """A shell-quoted string that survives Snakemake's {} formatting of shell.prefix."""
    return shlex.quote(text).replace("{", "{{").replace("}", "}}")


# Every shell command (bash) starts with this: strict mode, the repository on PYTHONPATH, and
# the two shell variables the rules' commands use, $PYTHON (the interpreter) and $SCRIPTS
# (workflow_scripts/). Shell variables, not {PYTHON}-style globals: `snakemake --lint` clean.
# BRAINMRI_JOBS_PER_GPU: job slots per GPU (config gpu_jobs_per_device, brainmri/devices.py);
# BRAINMRI_DEVICE: auto | cuda | cpu (config device).
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={_shell_literal(str(REPO))}"
    "${{PYTHONPATH:+:$PYTHONPATH}}; "
    f"PYTHON={_shell_literal(_INTERPRETER)}; SCRIPTS={_shell_literal(str(SCRIPTS))}; "
    f"export BRAINMRI_JOBS_PER_GPU={int(config['gpu_jobs_per_device'])}; "
    f"export BRAINMRI_DEVICE={config['device']}; "
)

BACKBONES = model_names(config, "classification")
ARCHITECTURES = model_names(config, "segmentation")
FOLDS = list(range(config["split"]["folds"]))
DATASETS = {
    "lgg": "lgg-mri-segmentation",
    "btm": "brain-tumor-mri-dataset",
}


wildcard_constraints:
    backbone="|".join(map(re.escape, BACKBONES)) if BACKBONES else "none",
    arch="|".join(map(re.escape, ARCHITECTURES)),
    fold=r"\d+",
    model="|".join(map(re.escape, BACKBONES + ["ensemble"])),


VOTER_ARCH = config["cascade"]["architecture"]
FINAL_MODEL = config["segmentation"]["final_model"]


def voter_files() -> list[str]:
    """The segmentation voter's table and choice of k, when
    classification.segmentation_voter.enabled (else none)."""
    if not config["classification"]["segmentation_voter"]["enabled"]:
        return []
    return [
        results("classification/segvoter/test_predictions.csv"),
        results("classification/segvoter/min_pixels.json"),
    ]


def voter_arguments(files) -> str:
    """ensemble_classifiers.py's voter options for :func:`voter_files`' files."""
    files = list(files)
    if not files:
        return ""
    table, choice = files
    return f"--voter-table {shlex.quote(table)} --voter-choice {shlex.quote(choice)}"


def voter_choice() -> list[str]:
    """min_pixels.json (the run's k) for the prediction rules, when the voter is on."""
    return voter_files()[1:]


def prediction_models() -> dict[str, list[str]]:
    """The models and run files the prediction rules read (predict, predict_volume): the
    configured backbones, cascade.architecture's fold models and, with the segmentation voter,
    its min_pixels.json (the run's k): exactly the evaluated ensemble."""
    return {
        "classifiers": expand(
            results("classification/{backbone}/model.pt"), backbone=BACKBONES
        ),
        "segmenters": expand(
            results(f"segmentation/{VOTER_ARCH}/fold{{fold}}/model.pt"), fold=FOLDS
        ),
        "voter": voter_choice(),
    }


def prediction_arguments(input) -> str:
    """The decision options of predict.py and predict_volume.py: the run's ensemble."""
    classification = config["classification"]
    segmentation = config["segmentation"]
    voter = list(input.voter)
    return " ".join(
        [
            f"--method {classification['ensemble']}",
            f"--classifier-threshold {classification['threshold']}",
            f"--segmentation-threshold {segmentation['threshold']}",
            *([f"--segmentation-voter {shlex.quote(voter[0])}"] if voter else []),
            f"--smooth-window {classification['smooth_window']}",
            *(["--tta"] if segmentation["tta"] else []),
            f"--postprocess {shlex.quote(as_json(segmentation['postprocess']))}",
        ]
    )


def results(path: str) -> str:
    """A path under the configured results directory."""
    return str(RESULTS / path)


def as_json(value) -> str:
    """Config values for a script's --settings argument (params: rerun on change)."""
    return json.dumps(value, sort_keys=True)


# Config groups that do not change a result the report shows: the prediction targets' inputs
# and where jobs run. Left out of the report's params, so that e.g. `--config predict=...` on
# the default target does not rerun the report.
NOT_REPORTED = ("predict", "gpu_jobs_per_device")


def report_config() -> str:
    """The run's config as the report shows it (report/metrics.json "config"), as JSON."""
    return as_json(
        {key: value for key, value in config.items() if key not in NOT_REPORTED}
    )


def classifier_settings(wildcards) -> str:
    return as_json(training_settings(config, "classification", wildcards.backbone))


def segmenter_settings(wildcards) -> str:
    return as_json(training_settings(config, "segmentation", wildcards.arch))


def final_model_outputs(name: str) -> list[str]:
    """``segmentation/<arch>/final/<name>`` of every architecture when
    segmentation.final_model.enabled (the all-patients models), else none."""
    if not FINAL_MODEL["enabled"]:
        return []
    return expand(
        results("segmentation/{arch}/final/{name}"), arch=ARCHITECTURES, name=name
    )


def final_model_histories(wildcards) -> list[str]:
    """The fold models' histories whose best epochs set the final model's epochs
    (final_model.epochs null); none when the config gives the epochs."""
    if FINAL_MODEL["epochs"] is not None:
        return []
    return expand(
        results("segmentation/{arch}/fold{fold}/history.csv"),
        arch=wildcards.arch,
        fold=FOLDS,
    )


def final_model_epochs(wildcards, input) -> str:
    """train.py's epochs option of the final model: the configured number, or the histories."""
    if FINAL_MODEL["epochs"] is not None:
        return f"--epochs {int(FINAL_MODEL['epochs'])}"
    return " ".join(
        ["--fold-histories", *(shlex.quote(path) for path in input.histories)]
    )


def classifier_weights(wildcards) -> list[str]:
    """The cached ImageNet weights a backbone starts from, if it is pretrained."""
    settings = training_settings(config, "classification", wildcards.backbone)
    if not settings["pretrained"]:
        return []
    return [str(WEIGHTS / "timm" / f"{wildcards.backbone}.safetensors")]


def segmenter_weights(wildcards) -> list[str]:
    """The cached ImageNet encoder weights an architecture starts from, if pretrained."""
    settings = training_settings(config, "segmentation", wildcards.arch)
    if not settings["pretrained"]:
        return []
    return [str(WEIGHTS / "smp" / f"{settings['encoder']}.safetensors")]


# What a segmenter's training job reads: a fold model's (train_segmenter) and the final model's
# (train_segmenter_final, which adds the fold histories).
SEGMENTER_TRAINING_INPUTS = {
    "manifest": results("data/manifest.csv"),
    "splits": results("splits/splits.csv"),
    "images": results("data/lgg/images.npy"),
    "masks": results("data/lgg/masks.npy"),
    "weights": segmenter_weights,
}


def predict_input_dir(wildcards) -> str:
    """The folder of new images for the predict target (rules/report.smk)."""
    folder = config["predict"]["input_dir"]
    if not folder:
        raise ValueError(
            "the predict target needs predict.input_dir: "
            "snakemake predict --config predict='{input_dir: path/to/images}'"
        )
    return folder


def predict_volume_inputs(wildcards) -> list[str]:
    """The patients (folders or NIfTI files) for the predict_volume target (rules/volume.smk)."""
    volumes = config["predict"]["volumes"]
    if not volumes:
        raise ValueError(
            "the predict_volume target needs predict.volumes: snakemake predict_volume "
            "--config predict='{volumes: [path/to/patient_folder, path/to/scan.nii.gz]}'"
        )
    return volumes


def training_devices() -> list[str]:
    """The device.json of every training job (the report's provenance)."""
    return (
        expand(results("classification/{backbone}/device.json"), backbone=BACKBONES)
        + expand(
            results("segmentation/{arch}/fold{fold}/device.json"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        )
        + final_model_outputs("device.json")
    )


def data_targets() -> list[str]:
    return [
        results("data/manifest.csv"),
        results("splits/splits.csv"),
        results("splits/summary.tsv"),
    ]


def classification_targets() -> list[str]:
    models = BACKBONES + ["ensemble"]
    return expand(results("classification/{model}/test_metrics.json"), model=models)


def segmentation_targets() -> list[str]:
    return [
        results("segmentation/summary.json"),
        *final_model_outputs("test_metrics.json"),
    ]


def model_targets() -> list[str]:
    """Every training job's outputs (models, histories, test predictions).

    The default target asks for them so that a model lost by a stopped training job
    (Snakemake deletes a failed job's outputs) is trained again, resuming from its last epoch,
    by the next plain run, and everything computed from it is redone. Without this, results
    computed from the lost model would stand and Snakemake would say "Nothing to be done".
    """
    final = FINAL_MODEL["enabled"]
    return [
        *expand(rules.train_classifier.output, backbone=BACKBONES),
        *expand(rules.train_segmenter.output, arch=ARCHITECTURES, fold=FOLDS),
        *(
            expand(rules.train_segmenter_final.output, arch=ARCHITECTURES)
            if final
            else []
        ),
    ]


def all_targets() -> list[str]:
    return [
        *data_targets(),
        *model_targets(),
        *classification_targets(),
        *segmentation_targets(),
        results("cascade/metrics.json"),
        results("report/report.html"),
        results("report/metrics.json"),
    ]


def by_name(names: list[str], paths) -> dict[str, str]:
    """{name: path} for a named input expanded over ``names`` (in the same order)."""
    paths = list(paths)
    if len(paths) != len(names):
        raise ValueError(f"{len(paths)} files for {len(names)} names: {names}")
    return dict(zip(names, paths))


def report_benchmarks() -> list[str]:
    """The benchmark file of every job the report depends on (its run-time table). Named to the
    report by path, not as inputs: a benchmark file deleted or never written (`--touch`) must
    not make Snakemake rerun the job; the report leaves such a job out of its table."""
    voter = config["classification"]["segmentation_voter"]["enabled"]
    final = FINAL_MODEL["enabled"]
    final_benchmarks = [
        rules.train_segmenter_final.benchmark,
        rules.evaluate_segmenter_final.benchmark,
    ]
    return [
        *expand(rules.fetch.benchmark, dataset=DATASETS.values()),
        rules.preprocess_lgg.benchmark,
        rules.preprocess_btm.benchmark,
        rules.manifest.benchmark,
        rules.split.benchmark,
        *expand(rules.train_classifier.benchmark, backbone=BACKBONES),
        rules.ensemble_classifiers.benchmark,
        *([rules.segmentation_voter.benchmark] if voter else []),
        *expand(rules.evaluate_classifier.benchmark, model=BACKBONES + ["ensemble"]),
        *expand(rules.train_segmenter.benchmark, arch=ARCHITECTURES, fold=FOLDS),
        *expand(rules.evaluate_segmenter.benchmark, arch=ARCHITECTURES, fold=FOLDS),
        *expand(rules.segmentation_fold_ensemble.benchmark, arch=ARCHITECTURES),
        *(expand(final_benchmarks, arch=ARCHITECTURES) if final else []),
        rules.summarize_segmentation.benchmark,
        rules.cascade.benchmark,
    ]


def report_files(input) -> str:
    """The report's named inputs as one JSON mapping, role -> file or {name: file}: the only
    files make_report.py reads."""
    models = BACKBONES + ["ensemble"]
    folds = [f"{arch}/fold{fold}" for arch in ARCHITECTURES for fold in FOLDS]
    per_model = ("test_metrics", "classification_report", "confusion_matrix", "errors")
    per_fold = ("val_metrics", "test_probabilities", "segmenter_history")
    benchmarks = Path(results("benchmarks"))
    files = {
        role: getattr(input, role)
        for role in (
            "manifest",
            "splits",
            "split_summary",
            "masks",
            "png",
            "segmentation_summary",
            "overlays",
            "cascade_metrics",
            "cascade_table",
            "cascade_per_slice",
        )
    }
    return as_json(
        files
        | {role: by_name(models, getattr(input, role)) for role in per_model}
        | {role: by_name(folds, getattr(input, role)) for role in per_fold}
        | {
            "predictions": by_name(BACKBONES, input.predictions),
            "classifier_history": by_name(BACKBONES, input.classifier_history),
            "segmentation_tables": by_name(
                ["table1_validation", "table2_test"], input.segmentation_tables
            ),
            "ensemble_per_slice": by_name(ARCHITECTURES, input.ensemble_per_slice),
            "benchmarks": {
                Path(path).relative_to(benchmarks).with_suffix("").as_posix(): path
                for path in report_benchmarks()
            },
            "devices": list(input.devices),
        }
        | {"voter_choice": path for path in input.voter_choice}
    )
