"""The recipe's scripts on the tiny preprocessed data: the segmentation voter, smoothing in the
classifier ensemble, post-processing in the fold ensemble, test Dice by sequence group."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from helpers import run_script

from brainmri.evaluation.masks import load_masks
from brainmri.io import write_csv, write_npy
from brainmri.tables import load_table


def test_voter_smoothing_and_postprocessing_scripts(preprocessed_data, tmp_path):
    data = preprocessed_data
    table = load_table(data.manifest, data.splits)
    test = table[table["seg_split"] == "test"].reset_index(drop=True)
    train = table[table["seg_split"] == "train"]
    masks = load_masks(data.lgg_masks, test)
    stored = masks.astype(np.uint8) * 255
    speck = np.flatnonzero(test["has_tumor"].to_numpy() == 0)[0]
    stored[speck, 0, 0] = 255  # a 1-voxel false positive on a tumor-free slice
    probabilities = tmp_path / "test_probabilities.npy"
    write_npy(probabilities, stored)
    # Out-of-fold validation: the true areas, plus 2 px on every tumor-free slice.
    area = load_masks(data.lgg_masks, train).reshape(len(train), -1).sum(1)
    val = pd.DataFrame(
        {"split": "val", "has_tumor": train["has_tumor"].to_numpy(), "pred_area": area + 2}
    )
    fold_slices = tmp_path / "per_slice.csv"
    write_csv(fold_slices, val)
    common = ("--manifest", data.manifest, "--splits", data.splits)
    out = tmp_path / "segvoter"
    run_script(
        "segmentation_voter.py",
        *("--probabilities", probabilities, "--fold-slices", fold_slices, *common),
        *("--output", out / "test_predictions.csv", "--choice", out / "min_pixels.json"),
        check=True,
    )
    choice = json.loads((out / "min_pixels.json").read_text())
    assert choice["min_pixels"] == 3 and choice["validation_accuracy"] == 1.0
    voter = pd.read_csv(out / "test_predictions.csv")
    assert list(voter["id"]) == list(test["id"])
    assert (voter["pred"] == voter["label"]).all()  # the 1-px speck is below k = 3

    # The ensemble with the voter and smoothing along the slice order.
    backbone = voter.assign(pred=1 - voter["pred"], prob_tumor=0.3)[
        ["id", "patient", "label", "prob_tumor", "pred"]
    ]
    write_csv(tmp_path / "b.csv", backbone)
    ensemble = tmp_path / "ensemble.csv"
    run_script(
        "ensemble_classifiers.py",
        *("--predictions", tmp_path / "b.csv", out / "test_predictions.csv"),
        *("--manifest", data.manifest, "--smooth-window", 3, "--output", ensemble),
        *("--threshold", 0.5, "--method", "majority"),
        check=True,
    )
    result = pd.read_csv(ensemble)
    assert len(result) == len(test) and set(result["votes"]) == {1}

    # Post-processing in the fold ensemble removes the speck; by_sequences is reported.
    metrics = tmp_path / "ens" / "test_metrics.json"
    run_script(
        "segmentation_ensemble.py",
        *("--probabilities", probabilities, *common, "--masks", data.lgg_masks),
        *("--threshold", 0.5),
        *("--postprocess", json.dumps({"min_component_voxels": 2}), "--metrics", metrics),
        *("--per-slice", tmp_path / "ens" / "per_slice.csv"),
        *("--output-probabilities", tmp_path / "ens" / "p.npy"),
        check=True,
    )
    report = json.loads(metrics.read_text())
    assert report["postprocess"] == {"min_component_voxels": 2, "keep_largest": False}
    assert report["all_slices"]["dice"]["mean"] == 1.0
    assert set(report["by_sequences"]) == {"all_sequences", "missing_sequence"}
