"""The evaluation scripts end to end, as the rules call them, on the tiny preprocessed dataset:
classifier ensemble and evaluation, segmenter evaluation (a small smp model), fold ensemble,
Tables 1-2 and the cascade; bad input gives one clear line, exit 1 and no output."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SCRIPTS, run_script
from PIL import Image
from sklearn.metrics import classification_report, roc_auc_score

from brainmri.evaluation.classification import classification_errors
from brainmri.evaluation.masks import binarize, load_masks, mean_probabilities, quantize
from brainmri.evaluation.segmentation import evaluate_split, per_slice_metrics
from brainmri.io import write_csv, write_json, write_npy
from brainmri.reporting.plotting import (
    confusion_figure,
    error_gallery,
    load_gallery_items,
    overlay_figure,
    save_figure,
)
from brainmri.tables import load_table

PER_SLICE_COLUMNS = [
    "id",
    "patient",
    "split",
    "has_tumor",
    "dice",
    "jaccard",
    "hd",
    "assd",
    "pred_area",
    "true_area",
    "case",
]


@pytest.fixture(scope="module")
def data(preprocessed_data):
    table = load_table(preprocessed_data.manifest, preprocessed_data.splits)
    test = table[table["seg_split"] == "test"].reset_index(drop=True)
    assert 0 < test["has_tumor"].sum() < len(test)  # both kinds of slices to score
    return preprocessed_data, table, test, load_masks(preprocessed_data.lgg_masks, test)


def run_in_process(name: str, *args) -> tuple[int, str]:
    """Run a script's ``__main__`` in this process (fast: nothing to import again); return its
    exit status and stderr. Only for runs that fail before any model work."""
    argv = [str(SCRIPTS / name), *map(str, args)]
    stderr = io.StringIO()
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit_:
            return int(exit_.code or 0), stderr.getvalue()
    return 0, stderr.getvalue()


def fails_cleanly(name: str, *args, names: tuple[str, ...], out_dir) -> None:
    """The script exits 1 with one 'error' line naming ``names`` and writes nothing."""
    code, stderr = run_in_process(name, *args)
    assert code == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error"), stderr[-2000:]
    for text in names:
        assert text in last, last
    assert not [p for p in out_dir.rglob("*") if p.is_file()]


# --- classification -------------------------------------------------------------------------


def backbone_predictions(test: pd.DataFrame, flip: list[int], prob_shift: float = 0.0):
    """Predictions equal to the labels except at positions ``flip``."""
    label = test["has_tumor"].to_numpy()
    pred = label.copy()
    pred[flip] = 1 - pred[flip]
    prob = np.clip(np.where(pred == 1, 0.8, 0.2) + prob_shift, 0, 1)
    return pd.DataFrame(
        {
            "id": test["id"],
            "patient": test["patient"],
            "label": label,
            "prob_tumor": prob,
            "pred": pred,
        }
    )


def test_ensemble_classifiers_script_votes_and_checks_ids(data, tmp_path):
    _, _, test, _ = data
    paths = []
    for k, flip in enumerate([[0], [1], [2, 3]]):
        paths.append(tmp_path / f"m{k}" / "test_predictions.csv")
        write_csv(paths[-1], backbone_predictions(test, flip, 0.01 * k))
    output = tmp_path / "ensemble" / "test_predictions.csv"
    run_script(
        "ensemble_classifiers.py",
        *("--method", "majority", "--threshold", 0.5, "--predictions", *paths),
        *("--output", output),
        check=True,
    )
    result = pd.read_csv(output)
    assert list(result.columns) == ["id", "patient", "label", "prob_tumor", "pred", "votes"]
    assert list(result["id"]) == list(test["id"])
    # Every slice is wrong in at most one of the three models -> the vote is always right.
    assert (result["pred"] == result["label"]).all()
    assert result.loc[1, "votes"] == (2 if test.loc[1, "has_tumor"] == 1 else 1)
    assert result.loc[5, "votes"] == (3 if test.loc[5, "has_tumor"] == 1 else 0)

    shuffled = tmp_path / "shuffled.csv"
    write_csv(shuffled, backbone_predictions(test, []).iloc[::-1])
    bad = tmp_path / "bad"
    fails_cleanly(
        "ensemble_classifiers.py",
        *("--method", "majority", "--threshold", 0.5, "--predictions", paths[0], shuffled),
        *("--output", bad / "test_predictions.csv"),
        names=(str(shuffled), "ids differ"),
        out_dir=bad,
    )


def test_ensemble_script_segmentation_method_the_voter_decides(data, tmp_path):
    _, _, test, _ = data
    paths = []
    for k in range(3):  # three classifiers wrong on every slice
        paths.append(tmp_path / f"m{k}" / "test_predictions.csv")
        write_csv(paths[-1], backbone_predictions(test, list(range(len(test)))))
    label = test["has_tumor"].to_numpy()
    areas = np.where(label == 1, 9, 2)
    areas[0] = 9 if label[0] == 0 else 2  # the voter (k = 5) wrong on slice 0 only
    voter = tmp_path / "segvoter" / "test_predictions.csv"
    write_csv(voter, pd.DataFrame({"id": test["id"], "pred_area": areas}))
    choice = tmp_path / "segvoter" / "min_pixels.json"
    write_json(choice, {"min_pixels": 5})
    output = tmp_path / "ensemble" / "test_predictions.csv"
    common = ("--threshold", 0.5, "--predictions", *paths)
    run_script(
        "ensemble_classifiers.py",
        *("--method", "segmentation", *common, "--voter-table", voter, "--voter-choice", choice),
        *("--output", output),
        check=True,
    )
    result = pd.read_csv(output)
    assert list(result.columns) == [
        *("id", "patient", "label", "prob_tumor", "pred", "votes", "segmentation_voter")
    ]
    voted = (areas >= 5).astype(int)
    assert result["pred"].tolist() == voted.tolist()  # the voter's, not the classifiers' 3 votes
    assert result["segmentation_voter"].tolist() == voted.tolist()
    assert result["prob_tumor"].tolist() == voted.tolist()
    assert result["votes"].tolist() == (3 * (1 - label) + voted).tolist()
    assert (result["pred"] == result["label"]).sum() == len(test) - 1

    bad = tmp_path / "bad"
    fails_cleanly(
        "ensemble_classifiers.py",
        *("--method", "segmentation", *common, "--output", bad / "test_predictions.csv"),
        names=("--method segmentation needs --voter-table and --voter-choice",),
        out_dir=bad,
    )


def classifier_args(data, predictions_path, out, threshold=0.5) -> list:
    preprocessed = data[0]
    return [
        *("--model", "ensemble", "--predictions", predictions_path, "--threshold", threshold),
        *("--manifest", preprocessed.manifest, "--images", f"lgg={preprocessed.lgg_images}"),
        *("--masks", f"lgg={preprocessed.lgg_masks}"),
        *("--metrics", out / "test_metrics.json", "--table", out / "classification_report.tsv"),
        *("--confusion", out / "confusion_matrix.png", "--gallery", out / "errors.png"),
    ]


def test_evaluate_classifier_script_matches_scikit_learn(data, tmp_path):
    _, _, test, _ = data
    tumor = np.flatnonzero(test["has_tumor"].to_numpy() == 1)
    healthy = np.flatnonzero(test["has_tumor"].to_numpy() == 0)
    frame = backbone_predictions(test, [tumor[0], tumor[1], healthy[0]])
    path = tmp_path / "test_predictions.csv"
    write_csv(path, frame)
    out = tmp_path / "out"
    run_script("evaluate_classifier.py", *classifier_args(data, path, out), check=True)
    metrics = json.loads((out / "test_metrics.json").read_text())
    expected = classification_report(
        frame["label"], frame["pred"], target_names=["no_tumor", "tumor"], output_dict=True
    )
    assert metrics["model"] == "ensemble" and metrics["n"] == len(test)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    for name in ("no_tumor", "tumor"):
        for key in ("precision", "recall", "f1-score", "support"):
            assert metrics["classes"][name][key] == pytest.approx(expected[name][key])
    for ours, theirs in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        assert metrics[ours]["f1-score"] == pytest.approx(expected[theirs]["f1-score"])
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(frame["label"], frame["prob_tumor"]))
    assert (metrics["false_negatives"], metrics["false_positives"]) == (2, 1)
    assert metrics["confusion_matrix"] == [
        [len(healthy) - 1, 1],
        [2, len(tumor) - 2],
    ]
    table = pd.read_csv(out / "classification_report.tsv", sep="\t", keep_default_na=False)
    assert list(table["class"]) == ["no_tumor", "tumor", "accuracy", "macro avg", "weighted avg"]
    assert list(table.columns) == ["class", "precision", "recall", "f1-score", "support"]
    assert float(table.loc[1, "recall"]) == pytest.approx(expected["tumor"]["recall"], abs=1e-4)
    assert table.loc[2, "support"] == len(test)
    for name in ("confusion_matrix.png", "errors.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100


def test_evaluate_classifier_without_errors_or_negatives(data, tmp_path):
    _, _, test, _ = data
    perfect = backbone_predictions(test, [])
    only_tumor = perfect[perfect["label"] == 1]
    path = tmp_path / "test_predictions.csv"
    write_csv(path, only_tumor)
    out = tmp_path / "out"
    run_script("evaluate_classifier.py", *classifier_args(data, path, out), check=True)
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["accuracy"] == 1.0
    assert metrics["roc_auc"] is None and "one class" in metrics["roc_auc_note"]
    assert (metrics["false_negatives"], metrics["false_positives"]) == (0, 0)
    assert (out / "errors.png").stat().st_size > 0  # 'no false negatives' panels


def test_evaluate_classifier_applies_the_cut_off_to_a_single_models_probabilities(data, tmp_path):
    _, _, test, _ = data
    probabilities = backbone_predictions(test, []).drop(columns="pred")  # as training writes
    path = tmp_path / "test_predictions.csv"
    write_csv(path, probabilities)
    tumor = int(test["has_tumor"].sum())
    for threshold, false_negatives in ((0.5, 0), (0.9, tumor)):
        out = tmp_path / f"out{threshold}"
        run_script(
            "evaluate_classifier.py", *classifier_args(data, path, out, threshold), check=True
        )
        metrics = json.loads((out / "test_metrics.json").read_text())
        assert metrics["threshold"] == threshold
        assert (metrics["false_negatives"], metrics["false_positives"]) == (false_negatives, 0)


def test_evaluate_classifier_refuses_unknown_ids(data, tmp_path):
    _, _, test, _ = data
    frame = backbone_predictions(test, [])
    frame.loc[3, "id"] = "not_a_slice"
    path = tmp_path / "test_predictions.csv"
    write_csv(path, frame)
    out = tmp_path / "out"
    fails_cleanly(
        "evaluate_classifier.py",
        *classifier_args(data, path, out),
        names=(str(path), "not_a_slice"),
        out_dir=out,
    )


def test_figures_are_deterministic(data, tmp_path):
    preprocessed, table, test, _ = data
    frame = backbone_predictions(test, [0, 2])
    fn, fp = classification_errors(frame)
    manifest = table.drop(columns=["cls_split", "seg_split", "fold"])
    images, masks = {"lgg": preprocessed.lgg_images}, {"lgg": preprocessed.lgg_masks}

    def draw(name: str) -> bytes:
        errors = {
            "false negatives": load_gallery_items(fn, manifest, images, masks),
            "false positives": load_gallery_items(fp, manifest, images, masks),
        }
        save_figure(error_gallery(errors, "errors", {"false negatives": 1}), tmp_path / name)
        save_figure(confusion_figure([[5, 1], [2, 8]], "cm"), tmp_path / f"cm_{name}")
        return (tmp_path / name).read_bytes() + (tmp_path / f"cm_{name}").read_bytes()

    assert draw("a.png") == draw("b.png")


# --- segmentation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised smp U-Net whose input size (96) differs from the data's (64)."""
    from brainmri.models import build_segmenter, save_checkpoint

    settings = {
        "name": "unet",
        "arch": "Unet",
        "encoder": "resnet18",
        "input_size": 96,
        "pretrained": False,
    }
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save_checkpoint(path, build_segmenter(settings), "segmentation", settings, epoch=0)
    return path


def segmenter_args(data, checkpoint, out, fold=0) -> list:
    preprocessed = data[0]
    return [
        *("--checkpoint", checkpoint, "--fold", fold, "--manifest", preprocessed.manifest),
        *("--splits", preprocessed.splits, "--images", preprocessed.lgg_images),
        *("--masks", preprocessed.lgg_masks, "--threshold", 0.5, "--threads", 1),
        *("--val-metrics", out / "val_metrics.json", "--test-metrics", out / "test_metrics.json"),
        *("--per-slice", out / "per_slice.csv"),
        *("--test-probabilities", out / "test_probabilities.npy"),
    ]


def test_evaluate_segmenter_script(data, checkpoint, tmp_path):
    _, table, test, masks = data
    val = table[(table["seg_split"] == "train") & (table["fold"] == 0)]
    first, second = tmp_path / "run1", tmp_path / "run2"
    for out in (first, second):
        run_script(
            "evaluate_segmenter.py",
            *segmenter_args(data, checkpoint, out),
            env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
            check=True,
        )
    probabilities = np.load(first / "test_probabilities.npy")
    assert probabilities.dtype == np.uint8 and probabilities.shape == masks.shape
    assert probabilities.min() < probabilities.max()  # a real model's output, not a constant
    per_slice = pd.read_csv(first / "per_slice.csv", keep_default_na=False)
    assert list(per_slice.columns) == PER_SLICE_COLUMNS
    assert per_slice["split"].tolist() == ["val"] * len(val) + ["test"] * len(test)
    assert per_slice["id"].tolist() == list(val["id"]) + list(test["id"])
    # The test rows are the metrics of the stored probabilities at the threshold.
    scored = per_slice_metrics(binarize(probabilities, 0.5), masks)
    test_rows = per_slice[per_slice["split"] == "test"].reset_index(drop=True)
    assert np.allclose(test_rows[["dice", "hd", "assd"]], scored[["dice", "hd", "assd"]])
    assert (test_rows["true_area"] == masks.sum((1, 2))).all()
    for split, rows in (("val", val), ("test", test)):
        report = json.loads((first / f"{split}_metrics.json").read_text())
        assert (report["arch"], report["fold"], report["split"]) == ("unet", 0, split)
        assert report["n_slices"] == len(rows) and report["input_size"] == 96
        assert report["tumor_slices"]["n_slices"] == int(rows["has_tumor"].sum())
        assert sum(report["all_slices"]["cases"].values()) == len(rows)
        part = per_slice[per_slice["split"] == split]
        assert report["all_slices"]["dice"]["mean"] == pytest.approx(part["dice"].mean())
        assert set(report["volume_dice"]["patients"]) == set(rows["patient"])
    # The overlap sums were taken on the inference device: the files hold exactly what the
    # NumPy path (evaluate_split from the stored probabilities alone) gives.
    frame, reference = evaluate_split(test, probabilities, masks, 0.5, "test")
    write_csv(tmp_path / "expected.csv", frame)
    expected = pd.read_csv(tmp_path / "expected.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(test_rows, expected, check_exact=True)
    written = json.loads((first / "test_metrics.json").read_text())
    for key in ("arch", "fold", "input_size", "tta"):
        written.pop(key)
    assert written == json.loads(json.dumps(reference))
    # Reproducible on the CPU: identical files.
    for name in ("test_probabilities.npy", "per_slice.csv", "val_metrics.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_evaluate_segmenter_refuses_a_fold_without_slices(data, checkpoint, tmp_path):
    out = tmp_path / "out"
    fails_cleanly(
        "evaluate_segmenter.py",
        *segmenter_args(data, checkpoint, out, fold=9),
        names=(str(data[0].splits), "fold 9"),
        out_dir=out,
    )


def ensemble_args(data, probabilities, out) -> list:
    preprocessed = data[0]
    return [
        *("--probabilities", *probabilities, "--manifest", preprocessed.manifest),
        *("--splits", preprocessed.splits, "--masks", preprocessed.lgg_masks),
        *("--threshold", 0.5, "--threads", 2, "--metrics", out / "test_metrics.json"),
        *("--per-slice", out / "per_slice.csv"),
        *("--output-probabilities", out / "test_probabilities.npy"),
    ]


def test_segmentation_ensemble_script(data, tmp_path):
    _, _, test, masks = data
    folds = [masks * np.uint8(255), masks * np.uint8(200), np.zeros_like(masks, np.uint8)]
    paths = []
    for k, array in enumerate(folds):
        paths.append(tmp_path / f"fold{k}.npy")
        write_npy(paths[-1], array.astype(np.uint8))
    out = tmp_path / "ensemble"
    run_script("segmentation_ensemble.py", *ensemble_args(data, paths, out), check=True)
    mean = np.load(out / "test_probabilities.npy")
    assert mean.dtype == np.uint8
    assert set(np.unique(mean[masks]).tolist()) == {152}  # (255 + 200 + 0) / 3 = 151.7
    assert not mean[~masks].any()
    report = json.loads((out / "test_metrics.json").read_text())
    assert report["models"] == 3 and report["split"] == "test"
    assert report["tumor_slices"]["dice"]["mean"] == 1.0
    assert report["all_slices"]["hd"]["mean"] == 0.0
    assert report["all_slices"]["cases"]["both_empty"] == int((test["has_tumor"] == 0).sum())
    assert report["volume_dice"]["mean"] == 1.0
    per_slice = pd.read_csv(out / "per_slice.csv", keep_default_na=False)
    assert list(per_slice.columns) == PER_SLICE_COLUMNS and len(per_slice) == len(test)

    short = tmp_path / "short.npy"
    write_npy(short, folds[0][:-1].astype(np.uint8))
    bad = tmp_path / "bad"
    fails_cleanly(
        "segmentation_ensemble.py",
        *ensemble_args(data, [paths[0], short], bad),
        names=(str(short), "shape"),
        out_dir=bad,
    )


def fold_outputs(root, arch, fold, data, shift):
    """Fold files as evaluate_segmenter writes them, from the masks shifted by ``shift`` px."""
    _, table, test, _ = data
    val = table[(table["seg_split"] == "train") & (table["fold"] == fold)]
    folder = root / "segmentation" / arch / f"fold{fold}"
    frames = []
    for split, rows in (("val", val), ("test", test)):
        truth = load_masks(data[0].lgg_masks, rows)
        stored = quantize(np.roll(truth, shift, axis=2).astype(float))
        frame, report = evaluate_split(rows, stored, truth, 0.5, split)
        report.update(arch=arch, fold=fold)
        write_json(folder / f"{split}_metrics.json", report)
        frames.append(frame)
        if split == "test":
            write_npy(folder / "test_probabilities.npy", stored)
    write_csv(folder / "per_slice.csv", pd.concat(frames))
    return folder


def fold_ensemble(root, arch, folders, data):
    """The fold ensemble's files, as segmentation_ensemble.py writes them."""
    _, _, test, masks = data
    stored = mean_probabilities([np.load(f / "test_probabilities.npy") for f in folders])
    frame, report = evaluate_split(test, stored, masks, 0.5, "test")
    folder = root / "segmentation" / arch / "ensemble"
    write_json(folder / "test_metrics.json", report)
    write_csv(folder / "per_slice.csv", frame)
    write_npy(folder / "test_probabilities.npy", stored)


def summary_args(root, out, data, seed=3) -> list:
    """The named inputs of the rule, architecture-major (unet, fpn), folds 0 and 1."""
    preprocessed = data[0]
    folder = root / "segmentation"
    archs, folds = ("unet", "fpn"), range(2)
    per_fold = [folder / a / f"fold{k}" for a in archs for k in folds]
    ensembles = [folder / a / "ensemble" for a in archs]
    return [
        *("--architectures", *archs, "--folds", 2),
        *("--val-metrics", *[f / "val_metrics.json" for f in per_fold]),
        *("--test-metrics", *[f / "test_metrics.json" for f in per_fold]),
        *("--fold-slices", *[f / "per_slice.csv" for f in per_fold]),
        *("--ensemble-metrics", *[f / "test_metrics.json" for f in ensembles]),
        *("--ensemble-slices", *[f / "per_slice.csv" for f in ensembles]),
        *("--ensemble-probabilities", *[f / "test_probabilities.npy" for f in ensembles]),
        *("--manifest", preprocessed.manifest, "--splits", preprocessed.splits),
        *("--images", preprocessed.lgg_images, "--masks", preprocessed.lgg_masks),
        *("--seed", seed, "--threshold", 0.5, "--summary", out / "summary.json"),
        *("--table1", out / "table1_validation.tsv", "--table2", out / "table2_test.tsv"),
        *("--per-slice", out / "per_slice.csv", "--overlays", out / "overlays.png"),
    ]


def test_summarize_segmentation_tables_and_overlays(data, tmp_path):
    root = tmp_path / "results"
    shifts = {"unet": (0, 1), "fpn": (2, 3)}
    for arch, arch_shifts in shifts.items():
        folders = [fold_outputs(root, arch, k, data, s) for k, s in enumerate(arch_shifts)]
        fold_ensemble(root, arch, folders, data)
    out = tmp_path / "out"
    run_script("summarize_segmentation.py", *summary_args(root, out, data), check=True)
    summary = json.loads((out / "summary.json").read_text())
    table1 = pd.read_csv(out / "table1_validation.tsv", sep="\t", keep_default_na=False)
    table2 = pd.read_csv(out / "table2_test.tsv", sep="\t", keep_default_na=False)
    assert table1["model"].tolist() == ["unet", "fpn"]
    assert table2["model"].tolist() == [
        "unet",
        "unet (fold ensemble)",
        "fpn",
        "fpn (fold ensemble)",
    ]
    for arch in shifts:
        folder = root / "segmentation" / arch
        for split, frame in (("val", table1), ("test", table2)):
            reports = [
                json.loads((folder / f"fold{k}" / f"{split}_metrics.json").read_text())
                for k in range(2)
            ]
            for metric, column in (("dice", "dice"), ("hd", "hd (px)")):
                values = np.array([r["tumor_slices"][metric]["mean"] for r in reports])
                cell = frame.loc[frame["model"] == arch, column].item()
                assert cell == f"{values.mean():.3f} ± {values.std():.3f}"
        ensemble = json.loads((folder / "ensemble" / "test_metrics.json").read_text())
        cell = table2.loc[table2["model"] == f"{arch} (fold ensemble)", "dice"].item()
        assert cell == f"{ensemble['tumor_slices']['dice']['mean']:.3f}"  # one model: no ±
    # unet fold 0 is exact on the test set, the shifted folds are not.
    per_fold = summary["architectures"]["unet"]["per_fold"]["test"]["tumor_dice"]
    assert per_fold[0] == 1.0 and per_fold[1] < 1.0
    assert summary["architectures"]["fpn"]["test"]["tumor_slices"]["dice"]["mean"] < 1.0
    assert summary["empty_mask_rules"]["both_empty"].startswith("Dice 1")
    per_slice = pd.read_csv(out / "per_slice.csv", keep_default_na=False)
    assert {"arch", "fold"} <= set(per_slice.columns)
    assert len(per_slice) == sum(
        len(pd.read_csv(root / "segmentation" / arch / f"fold{k}" / "per_slice.csv"))
        for arch in shifts
        for k in range(2)
    )
    # The overlay's first rows: the two worst slices of the unet fold ensemble (failures).
    ensemble_slices = pd.read_csv(root / "segmentation" / "unet" / "ensemble" / "per_slice.csv")
    tumor = ensemble_slices[ensemble_slices["has_tumor"] == 1]
    worst = tumor.sort_values(["dice", "id"], kind="stable")["id"].tolist()
    assert summary["overlay_slices"][:2] == worst[:2]
    with Image.open(out / "overlays.png") as image:
        assert image.format == "PNG" and image.height > 200

    (root / "segmentation" / "fpn" / "fold1" / "test_metrics.json").unlink()
    bad = tmp_path / "bad"
    fails_cleanly(
        "summarize_segmentation.py",
        *summary_args(root, bad, data),
        names=("fpn/fold1/test_metrics.json",),
        out_dir=bad,
    )


def test_overlay_figure_is_deterministic(data, tmp_path):
    preprocessed, _, test, masks = data
    images = np.load(preprocessed.lgg_images)[test["array_index"].to_numpy()[:3]]
    predictions = {"unet": np.roll(masks[:3], 1, axis=2), "fpn": masks[:3]}
    for name in ("a.png", "b.png"):
        save_figure(
            overlay_figure(images, masks[:3], predictions, ["x", "y", "z"]), tmp_path / name
        )
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# --- cascade --------------------------------------------------------------------------------


def cascade_args(data, classifier, probabilities, out) -> list:
    preprocessed = data[0]
    return [
        *("--classifier", classifier, "--probabilities", probabilities),
        *("--architecture", "unet", "--manifest", preprocessed.manifest),
        *("--splits", preprocessed.splits, "--masks", preprocessed.lgg_masks),
        *("--threshold", 0.5, "--threads", 1, "--metrics", out / "metrics.json"),
        *("--per-slice", out / "per_slice.csv", "--table", out / "comparison.tsv"),
    ]


def test_cascade_script(data, tmp_path):
    _, _, test, masks = data
    tumor = np.flatnonzero(test["has_tumor"].to_numpy() == 1)
    healthy = np.flatnonzero(test["has_tumor"].to_numpy() == 0)
    dropped, blob = tumor[0], healthy[0]
    segmentation = masks.copy()
    segmentation[blob, :4, :4] = True  # a false positive the gate removes
    probabilities = tmp_path / "test_probabilities.npy"
    write_npy(probabilities, quantize(segmentation.astype(float)))
    decisions = backbone_predictions(test, [dropped])  # also says 'no tumor' for the blob
    classifier = tmp_path / "test_predictions.csv"
    write_csv(classifier, decisions)
    out = tmp_path / "cascade"
    run_script("cascade.py", *cascade_args(data, classifier, probabilities, out), check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    alone, gated = metrics["segmentation_only"], metrics["cascade"]
    n, n_tumor = len(test), len(tumor)
    assert alone["dice_tumor_slices"] == 1.0
    assert alone["dice_all_slices"] == pytest.approx((n - 1) / n)  # the blob slice scores 0
    assert alone["detection"]["false_positive_slices"] == 1
    assert gated["dice_tumor_slices"] == pytest.approx((n_tumor - 1) / n_tumor)
    assert gated["dice_all_slices"] == pytest.approx((n - 1) / n)  # the dropped slice scores 0
    assert gated["detection"]["false_positive_slices"] == 0
    assert gated["detection"]["sensitivity"] == pytest.approx((n_tumor - 1) / n_tumor)
    area = masks.sum((1, 2))
    assert gated["gate"]["tumor_area_lost_fraction"] == pytest.approx(area[dropped] / area.sum())
    assert gated["gate"]["tumor_pixels_segmentation_found_on_dropped_slices"] == area[dropped]
    assert metrics["architecture"] == "unet" and metrics["n_slices"] == n
    table = pd.read_csv(out / "comparison.tsv", sep="\t")
    assert table["pipeline"].tolist() == ["segmentation only", "cascade"]
    assert table["false-positive slices"].tolist() == [1, 0]
    per_slice = pd.read_csv(out / "per_slice.csv", keep_default_na=False)
    assert per_slice["id"].tolist() == list(test["id"])
    assert per_slice.loc[dropped, "gate"] == 0 and per_slice.loc[dropped, "cascade_pred_area"] == 0

    write_csv(classifier, decisions.drop(index=3))
    bad = tmp_path / "bad"
    fails_cleanly(
        "cascade.py",
        *cascade_args(data, classifier, probabilities, bad),
        names=(str(classifier), "no decision"),
        out_dir=bad,
    )
