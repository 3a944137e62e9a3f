"""segmentation.final_model: one model per architecture trained on every non-test patient (all
folds, no validation, a fixed number of epochs chosen from the fold models), evaluated on the
test set like the fold ensemble and shown as a row of Table 2."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import REPO, run_script
from test_evaluation_scripts import (
    PER_SLICE_COLUMNS,
    fails_cleanly,
    fold_ensemble,
    fold_outputs,
    summary_args,
)
from test_training import segmenter_settings
from test_workflow import DEMO, dry_run, job_stats, modified_demo

from brainmri.config import preflight_errors, schema_errors
from brainmri.errors import InputError
from brainmri.evaluation.masks import load_masks
from brainmri.evaluation.postprocess import PostProcess
from brainmri.evaluation.segmentation import evaluate_split
from brainmri.io import write_json
from brainmri.models import load_checkpoint
from brainmri.reporting.report import RunResults
from brainmri.tables import load_table
from brainmri.training.evaluate import accuracy_per_sample
from brainmri.training.jobs import best_epoch_of, final_epochs, final_training_rows
from brainmri.training.loop import FitSettings, fit

ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())


@pytest.fixture(scope="module")
def data(preprocessed_data):
    """As in test_evaluation_scripts: the data, the table, the test rows and their masks."""
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    test = table[table["seg_split"] == "test"].reset_index(drop=True)
    return preprocessed_data, table, test, load_masks(preprocessed_data.lgg_masks, test)


# --- the number of epochs -------------------------------------------------------------------


def history(path, best_epochs: list[int], epochs: int = 10):
    """A fold history whose ``best`` column marks ``best_epochs`` (improvements)."""
    frame = pd.DataFrame({"epoch": range(1, epochs + 1), "train_loss": 0.5, "val_loss": 0.4})
    frame["best"] = frame["epoch"].isin(best_epochs).astype(int)
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("bests", "expected"),
    [
        ([3, 5, 9], 5),  # the median
        ([3, 4], 4),  # 3.5 rounds up
        ([2, 3], 3),  # 2.5 rounds up too (not to the even 2)
        ([7], 7),
        ([4, 4, 8, 10], 6),
    ],
)
def test_epochs_are_the_rounded_median_of_the_fold_models_best_epochs(tmp_path, bests, expected):
    paths = [history(tmp_path / f"fold{k}.csv", [1, best]) for k, best in enumerate(bests)]
    assert [best_epoch_of(p) for p in paths] == bests  # the last improvement, not the first
    assert final_epochs(paths) == expected


def test_a_history_without_a_best_epoch_is_refused_naming_it(tmp_path):
    path = history(tmp_path / "fold0.csv", [])
    with pytest.raises(InputError, match=r"fold0\.csv: no epoch improved"):
        final_epochs([path])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=r"bad\.csv: not a training history"):
        best_epoch_of(tmp_path / "bad.csv")


# --- training and evaluation ----------------------------------------------------------------


def test_fit_without_validation_keeps_the_last_epoch_and_follows_the_schedule(tmp_path):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    images = torch.rand(12, 3, 8, 8)
    labels = torch.arange(12) % 2

    def batches(epoch):
        return iter([(images[:6], labels[:6]), (images[6:], labels[6:])])

    settings = FitSettings(epochs=3, lr=0.1, patience=1, lr_schedule="cosine")
    result = fit(
        model, F.cross_entropy, accuracy_per_sample, batches, None, settings, cpu,
        tmp_path / "resume", "digest",
    )  # fmt: skip
    assert result.best_epoch == 2  # the last one, although nothing was validated
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result.best_state.items())
    history = pd.DataFrame(result.history)
    assert not [c for c in history.columns if c.startswith("val_")]
    assert history["best"].tolist() == [1, 1, 1]  # patience never stops it
    assert history["lr"].tolist() == pytest.approx([0.1, 0.075, 0.025])  # cosine over 3 epochs


def train_final(data, out, *epochs_args, settings=None):
    return run_script(
        "train.py", "segmentation", "--fold", "all", *epochs_args,
        "--settings", json.dumps(settings or segmenter_settings()),
        "--manifest", data.manifest, "--splits", data.splits,
        "--images", f"lgg={data.lgg_images}", "--masks", f"lgg={data.lgg_masks}",
        "--weights=", "--seed", "42", "--threads", "1",
        "--checkpoint", out / "model.pt", "--history", out / "history.csv",
        "--device-json", out / "device.json", env=ENV,
    )  # fmt: skip


def test_the_training_rows_are_exactly_the_non_test_patients(preprocessed_data):
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    rows = final_training_rows(table)
    lgg = table[table["source"] == "lgg"]
    test_patients = set(lgg.loc[lgg["seg_split"] == "test", "patient"])
    assert test_patients and set(rows["patient"]) == set(lgg["patient"]) - test_patients
    assert set(rows["fold"]) == set(range(preprocessed_data.folds))  # every fold
    assert len(rows) == int((lgg["seg_split"] != "test").sum())  # every slice of them


@pytest.fixture(scope="module")
def final_model(preprocessed_data, tmp_path_factory):
    """A final model trained with its epochs from two fold histories (best epochs 1 and 2)."""
    out = tmp_path_factory.mktemp("final")
    histories = [history(out / "h0.csv", [1]), history(out / "h1.csv", [1, 2])]
    result = train_final(preprocessed_data, out, "--fold-histories", *histories)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def test_the_final_model_trains_on_every_training_patient_without_validation(
    preprocessed_data, final_model
):
    out, log = final_model
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    rows = final_training_rows(table)
    assert "Final model: 2 epochs (median of the fold models' best epochs)" in log  # 1.5 -> 2
    assert f"{len(rows)} slices of {rows['patient'].nunique()} patients" in log
    frame = pd.read_csv(out / "history.csv")
    assert list(frame.columns) == [
        "epoch", "train_loss", "train_dice_all_slices", "train_dice_tumor_slices", "lr",
        "seconds", "best",
    ]  # fmt: skip
    assert frame["epoch"].tolist() == [1, 2] and frame["best"].tolist() == [1, 1]
    model, checkpoint = load_checkpoint(out / "model.pt")
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert checkpoint["fold"] == "all" and checkpoint["epoch"] == 2
    assert checkpoint["settings"]["epochs"] == 2 and checkpoint["settings"]["patience"] is None
    assert checkpoint["training_patients"] == rows["patient"].nunique()
    assert checkpoint["val_loss"] is None
    assert json.loads((out / "device.json").read_text())["type"] == "cpu"
    assert not (out / "resume").exists()


def test_the_configured_epochs_override_and_bad_options_fail(preprocessed_data, tmp_path):
    # Neither or both of --epochs and --fold-histories: a usage error, nothing written.
    for args in ((), ("--epochs", "1", "--fold-histories", tmp_path / "h.csv")):
        result = train_final(preprocessed_data, tmp_path / "x", *args)
        assert result.returncode == 2 and "exactly one of --epochs" in result.stderr
    assert not (tmp_path / "x").exists()
    out = tmp_path / "final"
    result = train_final(preprocessed_data, out, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final model: 1 epochs (--epochs)" in result.stderr
    assert len(pd.read_csv(out / "history.csv")) == 1


def final_evaluation_args(data, checkpoint, out, postprocess) -> list:
    return [
        *("--checkpoint", checkpoint, "--fold", "all", "--manifest", data.manifest),
        *("--splits", data.splits, "--images", data.lgg_images, "--masks", data.lgg_masks),
        *("--threshold", 0.5, "--threads", 1, "--tta", "--postprocess", json.dumps(postprocess)),
        *("--test-metrics", out / "test_metrics.json", "--per-slice", out / "per_slice.csv"),
        *("--test-probabilities", out / "test_probabilities.npy"),
    ]


def test_the_final_model_is_scored_on_the_test_set_with_tta_and_postprocessing(
    data, final_model, tmp_path
):
    preprocessed, _, test, masks = data
    checkpoint = final_model[0] / "model.pt"
    post = {"min_component_voxels": 5, "keep_largest": True}
    out = tmp_path / "eval"
    run_script(
        "evaluate_segmenter.py", *final_evaluation_args(preprocessed, checkpoint, out, post),
        env=ENV, check=True,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "per_slice.csv", "test_metrics.json", "test_probabilities.npy",
    ]  # fmt: skip
    report = json.loads((out / "test_metrics.json").read_text())
    assert (report["arch"], report["fold"], report["split"]) == ("unet", "all", "test")
    assert report["tta"] is True and report["postprocess"] == post
    assert report["epochs"] == 2 and report["n_slices"] == len(test)
    # The stored (raw) probabilities, cleaned per patient as the fold ensemble does.
    stored = np.load(out / "test_probabilities.npy")
    assert stored.shape == masks.shape
    _, expected = evaluate_split(test, stored, masks, 0.5, "test", 1, PostProcess(5, True))
    assert report["tumor_slices"] == expected["tumor_slices"]
    assert report["volume_dice"] == expected["volume_dice"]
    per_slice = pd.read_csv(out / "per_slice.csv", keep_default_na=False)
    assert list(per_slice.columns) == PER_SLICE_COLUMNS and set(per_slice["split"]) == {"test"}
    # A final model has no validation fold to write.
    bad = tmp_path / "bad"
    fails_cleanly_args = [*final_evaluation_args(preprocessed, checkpoint, bad, {})]
    result = run_script(
        "evaluate_segmenter.py", *fails_cleanly_args, "--val-metrics", bad / "v.json", env=ENV
    )
    assert result.returncode == 2 and "--val-metrics" in result.stderr and not bad.exists()


# --- Table 2, summary.json and the report ---------------------------------------------------


def test_table2_and_the_summary_get_an_all_patients_row(data, tmp_path):
    _, _, test, masks = data
    root = tmp_path / "results"
    finals = []
    for arch, shifts in {"unet": (0, 1), "fpn": (2, 3)}.items():
        folders = [fold_outputs(root, arch, k, data, s) for k, s in enumerate(shifts)]
        fold_ensemble(root, arch, folders, data)
        _, report = evaluate_split(test, masks.astype(np.uint8) * 255, masks, 0.5, "test")
        report.update(arch=arch, fold="all", epochs=7, patients=6, tta=False)
        finals.append(root / "segmentation" / arch / "final" / "test_metrics.json")
        write_json(finals[-1], report)
    out = tmp_path / "out"
    args = summary_args(root, out, data)
    run_script("summarize_segmentation.py", *args, "--final-metrics", *finals, check=True)
    table2 = pd.read_csv(out / "table2_test.tsv", sep="\t", keep_default_na=False)
    assert table2["model"].tolist() == [
        "unet", "unet (fold ensemble)", "unet (all-patients model)",
        "fpn", "fpn (fold ensemble)", "fpn (all-patients model)",
    ]  # fmt: skip
    row = table2[table2["model"] == "unet (all-patients model)"].iloc[0]
    assert row["dice"] == "1.000" and row["volume dice"] == "1.000"
    summary = json.loads((out / "summary.json").read_text())
    final = summary["architectures"]["unet"]["test_final_model"]
    assert final["tumor_slices"]["dice"]["mean"] == 1.0 and final["epochs"] == 7

    # Without the option: the tables as before (no final rows, no summary entry).
    plain = tmp_path / "plain"
    run_script("summarize_segmentation.py", *summary_args(root, plain, data), check=True)
    models = pd.read_csv(plain / "table2_test.tsv", sep="\t")["model"].tolist()
    assert not [m for m in models if "all-patients" in m]
    assert "test_final_model" not in json.loads((plain / "summary.json").read_text())[
        "architectures"
    ]["unet"]  # fmt: skip

    # A fold model's report given as a final one: refused, naming the file and nothing written.
    wrong = tmp_path / "wrong"
    fold_report = root / "segmentation" / "fpn" / "fold0" / "test_metrics.json"
    fails_cleanly(
        "summarize_segmentation.py", *summary_args(root, wrong, data),
        "--final-metrics", finals[0], fold_report,
        names=(str(fold_report), "final model"), out_dir=wrong,
    )  # fmt: skip


def test_the_report_headline_has_the_final_model_only_when_trained():
    def one_model(dice):
        return {"tumor_slices": {"dice": {"mean": dice}}, "volume_dice": {"mean": dice}}

    fold = {m: {"mean": 0.5} for m in ("dice", "jaccard", "hd", "assd")}
    arch = {
        "validation": {"tumor_slices": fold, "volume_dice": {"mean": 0.5}},
        "test": {"tumor_slices": fold, "volume_dice": {"mean": 0.5}},
        "test_fold_ensemble": one_model(0.6),
    }
    detection = {"sensitivity": 1, "specificity": 1, "false_positive_slices": 0}
    scores = {"dice_all_slices": 1, "dice_tumor_slices": 1, "volume_dice": 1}
    results = RunResults.__new__(RunResults)  # the headline from given numbers, no files
    results.config = {"split": {"level": "patient"}, "seed": 1, "data": {"source": "x"}}
    results.architectures = {"unet": {"arch": "Unet", "encoder": "resnet34"}}
    results.classification = {}
    results.cascade = {
        "segmentation_only": scores | {"detection": detection},
        "cascade": scores | {"detection": detection, "gate": "ensemble"},
        "architecture": "unet",
    }
    results.segmentation = {"architectures": {"unet": arch}}
    assert "test_final_model" not in results.headline()["segmentation"]["unet"]
    arch["test_final_model"] = one_model(0.7)
    entry = results.headline()["segmentation"]["unet"]
    assert entry["test_final_model"] == {"dice": 0.7, "volume_dice": 0.7}
    assert entry["test_fold_ensemble"] == {"dice": 0.6, "volume_dice": 0.6}


# --- the config and the workflow ------------------------------------------------------------


def with_final(config: dict, **final) -> dict:
    config = copy.deepcopy(config)
    config.setdefault("segmentation", {})["final_model"] = final
    return config


@pytest.mark.parametrize(
    ("final", "line"),
    [
        ({"enabled": "yes"}, "segmentation.final_model.enabled: expected boolean, got 'yes'"),
        ({"epochs": 0}, "segmentation.final_model.epochs: 0 is less than the minimum of 1"),
        ({"epochs": 2.5}, "segmentation.final_model.epochs: expected integer or null, got 2.5"),
        ({"epoch": 3}, "segmentation.final_model.epoch: unknown key (did you mean 'epochs'?)"),
    ],
)
def test_the_schema_rejects_bad_final_model_settings_in_one_line(final, line):
    demo = yaml.safe_load(DEMO.read_text())
    assert schema_errors(with_final(demo, **final), SCHEMA) == [line]


def test_preflight_rejects_final_epochs_inside_the_warm_up():
    from snakemake.utils import validate

    config = with_final(yaml.safe_load(DEMO.read_text()), enabled=True, epochs=2)
    config["segmentation"].update(lr_schedule="warmup_cosine", warmup_epochs=3)
    validate(config, str(REPO / "config" / "schema.yaml"), set_default=True)
    problems = [p for p in preflight_errors(config) if "final_model" in p]
    assert problems == [
        f"segmentation.final_model.epochs: 2 epochs leave none for the cosine schedule after "
        f"{arch}'s 3 warm-up epochs"
        for arch in ("unet", "deeplabv3plus")
    ]


@pytest.mark.parametrize("epochs", [None, 3])
def test_enabling_the_final_model_adds_its_jobs_and_retrains_no_fold(
    completed_demo, tmp_path, epochs
):
    final = {"enabled": True, "epochs": epochs}
    changed = modified_demo(tmp_path, lambda c: c["segmentation"].update(final_model=final))
    result = dry_run(completed_demo, "--configfile", str(changed), "-p")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert job_stats(output) == {
        "train_segmenter_final": 2, "evaluate_segmenter_final": 2,
        "summarize_segmentation": 1, "report": 1, "all": 1,
    }  # fmt: skip
    option = "--fold-histories" if epochs is None else "--epochs 3"
    assert output.count(f"train.py segmentation --fold all {option}") == 2
    plain = dry_run(completed_demo, "--configfile", str(DEMO))
    assert "Nothing to be done" in plain.stdout + plain.stderr, plain.stdout[-3000:]
