"""Predictions are the evaluated model: `predict` on the run's own test images (its preprocessed
PNGs) and `predict_volume` on its own test patients (their raw slice folders) give exactly the
decisions, votes and masks of the report's ensemble (classification/ensemble/
test_predictions.csv) and cascade (the fold ensemble's cleaned masks, gated by the ensemble; the
areas of cascade/per_slice.csv). For the default recipe (the tiny config inherits
config/config.yaml's: segmentation voter, flip TTA, per-volume post-processing) and for the
paper's (no voter, no TTA, no post-processing: the run's evaluation redone with those)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import REPO, TINY_CONFIG, run_script, snakemake
from PIL import Image
from snakemake.utils import validate

from brainmri.evaluation.decision import gate
from brainmri.evaluation.masks import binarize
from brainmri.evaluation.postprocess import PostProcess, clean_patients
from brainmri.tables import load_table

pytestmark = pytest.mark.slow

PAPER = {
    "classification": {"segmentation_voter": {"enabled": False}},
    "segmentation": {
        "tta": False,
        "postprocess": {"min_component_voxels": 0, "keep_largest": False},
    },
}


@pytest.fixture(scope="module")
def paper_run(workflow_run, tmp_path_factory):
    """The tiny run's models, evaluated again with the paper's evaluation recipe."""
    return evaluate_as_paper(workflow_run, tmp_path_factory.mktemp("paper") / "results")


def evaluate_as_paper(workflow_run: Path, results: Path) -> Path:
    """A copy of ``workflow_run`` whose evaluation is redone with the paper's recipe."""
    shutil.copytree(workflow_run, results, symlinks=True)
    extra = results.parent / "paper.yaml"
    extra.write_text(json.dumps({"results_dir": str(results), **PAPER}))
    run = snakemake(
        *("--configfile", str(TINY_CONFIG), str(extra), "--cores", "2", "--resources", "gpu=1"),
        *("--rerun-triggers", "mtime"),
        *("--forcerun", "evaluate_segmenter", "ensemble_classifiers"),
        *("--", results / "cascade" / "metrics.json"),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return results


def merged(base: dict, extra: dict) -> dict:
    """``extra`` on top of ``base``, nested mappings merged (as Snakemake merges configs)."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def run_config(results: Path) -> dict:
    """The tiny run's config as its jobs saw it: config/config.yaml (the Snakefile's
    configfile), tests/config/tiny.yaml on top, the schema's defaults; for the paper run, its
    evaluation settings on top of that."""
    config = merged(
        yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
        yaml.safe_load(TINY_CONFIG.read_text()),
    )
    if (results.parent / "paper.yaml").is_file():
        config = merged(config, PAPER)
    validate(config, str(REPO / "config" / "schema.yaml"), set_default=True)
    return config


def decision_arguments(results: Path, config: dict) -> list:
    """The options the predict rules pass (rules/common.smk prediction_arguments)."""
    classification, segmentation = config["classification"], config["segmentation"]
    arch = config["cascade"]["architecture"]
    args = [
        *("--classifiers", *sorted(results.glob("classification/*/model.pt"))),
        *("--segmenters", *sorted(results.glob(f"segmentation/{arch}/fold*/model.pt"))),
        *("--method", classification["ensemble"]),
        *("--classifier-threshold", classification["threshold"]),
        *("--segmentation-threshold", segmentation["threshold"]),
        *("--smooth-window", classification["smooth_window"]),
        *("--postprocess", json.dumps(segmentation["postprocess"])),
        *(["--tta"] if segmentation["tta"] else []),
    ]
    if classification["segmentation_voter"]["enabled"]:
        args += ["--segmentation-voter", results / "classification/segvoter/min_pixels.json"]
    return args


def evaluated(results: Path, config: dict):
    """The test slices, the ensemble's table and the cascade's masks, from the run's files."""
    table = load_table(results / "data/manifest.csv", results / "splits/splits.csv")
    seg_rows = table[(table["source"] == "lgg") & (table["seg_split"] == "test")]
    seg_rows = seg_rows.reset_index(drop=True)
    ensemble = pd.read_csv(results / "classification/ensemble/test_predictions.csv")
    ensemble = ensemble.set_index("id").loc[seg_rows["id"]]
    arch = config["cascade"]["architecture"]
    stored = np.load(results / f"segmentation/{arch}/ensemble/test_probabilities.npy")
    post = PostProcess.from_settings(config["segmentation"]["postprocess"])
    masks = clean_patients(binarize(stored, config["segmentation"]["threshold"]), seg_rows, post)
    cascade = gate(masks, ensemble["pred"].to_numpy())
    per_slice = pd.read_csv(results / "cascade/per_slice.csv").set_index("id").loc[seg_rows["id"]]
    np.testing.assert_array_equal(per_slice["gate"], ensemble["pred"])
    np.testing.assert_array_equal(per_slice["cascade_pred_area"], cascade.sum(axis=(1, 2)))
    np.testing.assert_array_equal(per_slice["segmentation_pred_area"], masks.sum(axis=(1, 2)))
    return seg_rows, ensemble.assign(area=per_slice["segmentation_pred_area"]), cascade


def upsample(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Masks at the array size back at the slices' size (nearest), as predict_volume does."""
    size = (shape[1], shape[0])
    return np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
            for m in masks
        ]
    )


def check_equal(name, table, masks, ensemble, cascade):
    """Decisions, votes, probabilities, the cleaned (ungated) segmentation's pixels at the
    array size (what the voter counts) and the cascade's masks of one command."""
    decision, votes, probability = table["decision"], table["votes"], table["tumor_probability"]
    np.testing.assert_array_equal(table["segmentation_area_px"], ensemble["area"], err_msg=name)
    assert (np.asarray(decision) == np.where(ensemble["pred"] == 1, "tumor", "no_tumor")).all(), (
        name
    )
    np.testing.assert_array_equal(votes, ensemble["votes"], err_msg=name)
    np.testing.assert_allclose(probability, ensemble["prob_tumor"], atol=2e-6, err_msg=name)
    np.testing.assert_array_equal(masks, cascade, err_msg=name)


def predict_images(results, config, rows, tmp_path):
    """predict on the test PNGs (with their masks beside, as <id>_mask.png), as a series."""
    scans = tmp_path / "scans"
    scans.mkdir()
    data = results / "data"
    for _, row in rows.iterrows():
        shutil.copy(data / row["image_path"], scans / f"{row['id']}.png")
        shutil.copy(data / row["mask_path"], scans / f"{row['id']}_mask.png")
    out = tmp_path / "predict"
    run_script(
        "predict.py",
        *("--input-dir", scans, *decision_arguments(results, config), "--series"),
        *("--output", out / "predictions.csv", "--masks-dir", out / "masks"),
        *("--overlays-dir", out / "overlays"),
        check=True,
    )
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("file")
    table = table.loc[[f"{i}.png" for i in rows["id"]]]
    masks = np.stack([np.asarray(Image.open(out / "masks" / f"{i}.png")) > 0 for i in rows["id"]])
    return table, masks


def predict_patients(results, config, rows, tmp_path):
    """predict_volume on the test patients' raw Kaggle slice folders."""
    raw = results / "raw" / "lgg-mri-segmentation"
    folders = sorted({(raw / path).parent for path in rows["original_path"]})
    out = tmp_path / "volume"
    run_script(
        "predict_volume.py",
        *("--inputs", *folders, *decision_arguments(results, config)),
        *("--csv", out / "volumes.csv", "--patients-dir", out / "patients"),
        check=True,
    )
    slices = pd.concat(
        [
            pd.read_csv(out / "patients" / folder.name / "slices.csv").assign(patient=folder.name)
            for folder in folders
        ]
    )
    slices["id"] = slices["patient"] + "_" + slices["slice"].astype(str)
    slices = slices.set_index("id").loc[rows["id"]]
    masks = np.stack(
        [
            np.asarray(Image.open(out / "patients" / p / "masks" / f"{i}_mask.png")) > 0
            for p, i in zip(rows["patient"], rows["id"], strict=True)
        ]
    )
    return slices, masks, pd.read_csv(out / "volumes.csv", keep_default_na=False)


@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_predictions_are_the_evaluated_ensemble_and_cascade(
    recipe, workflow_run, request, tmp_path
):
    results = workflow_run if recipe == "default" else request.getfixturevalue("paper_run")
    check_predictions_equal_evaluation(results, recipe, tmp_path)


def check_predictions_equal_evaluation(results: Path, recipe: str, tmp_path: Path) -> None:
    config = run_config(results)
    voter = config["classification"]["segmentation_voter"]["enabled"]
    assert voter == (recipe == "default")
    rows, ensemble, cascade = evaluated(results, config)
    # Something to compare (the tiny run's 2-epoch models may call every test slice no_tumor,
    # so that the cascade's masks are empty; the segmentation's are not).
    assert ensemble["area"].sum() > 0

    table, masks = predict_images(results, config, rows, tmp_path)
    check_equal("predict", table, masks, ensemble, cascade)
    voters = table["voters"].iloc[0].split(";")
    assert len(voters) == len(config["classification"]["backbones"]) + voter
    assert voter == voters[-1].startswith("segmentation_voter(k=")
    assert (table["segmentation_voter"] != "").all() == voter
    if voter:
        np.testing.assert_array_equal(
            table["segmentation_voter"] == "tumor", ensemble["segmentation_voter"] == 1
        )
    # The masks beside the images give each row its Dice against the truth.
    truth = np.stack([np.asarray(Image.open(results / "data" / p)) > 0 for p in rows["mask_path"]])
    inter = (masks & truth).sum(axis=(1, 2))
    total = masks.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    expected = np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))
    np.testing.assert_allclose(table["dice"].astype(float), expected, atol=1e-6)

    slices, masks, volumes = predict_patients(results, config, rows, tmp_path)
    # The raw slices are larger than the arrays: the mask goes back with nearest neighbours.
    check_equal("predict_volume", slices, masks, ensemble, upsample(cascade, masks.shape[1:]))
    assert (volumes["voters"] == table["voters"].iloc[0]).all()
