"""predict uses exactly the models it is given (the rule passes the configured ones), at the
preprocessing size its checkpoints record, with the evaluation thresholds of the config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_main_configures_torch, load_script, record_torch_setup, run_script
from PIL import Image

from brainmri.models import build_classifier, build_segmenter, save_checkpoint

CLASSIFIER = {"backbone": "resnet10t", "name": "resnet10t", "input_size": 64, "pretrained": False}
SEGMENTER = {"name": "unet", "arch": "Unet", "encoder": "resnet18", "input_size": 64}
PREPROCESSING = {"array_size": 48}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results tree: the configured models, and a leftover backbone of an earlier config
    whose model.pt is not a checkpoint at all (loading it would fail)."""
    root = tmp_path_factory.mktemp("results")
    torch.manual_seed(0)
    save_checkpoint(
        root / "classification" / "resnet10t" / "model.pt",
        build_classifier(CLASSIFIER),
        "classification",
        CLASSIFIER,
        preprocessing=PREPROCESSING,
    )
    for fold in range(2):
        save_checkpoint(
            root / "segmentation" / "unet" / f"fold{fold}" / "model.pt",
            build_segmenter({**SEGMENTER, "pretrained": False}),
            "segmentation",
            SEGMENTER,
            preprocessing=PREPROCESSING,
        )
    leftover = root / "classification" / "resnet50_from_an_earlier_config" / "model.pt"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"not a checkpoint")
    images = root.parent / "scans"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((50, 40)) * 255).astype(np.uint8)).save(images / name)
    return root, images


def predict_args(root, images, out, *classifiers, segmentation_threshold=0.5) -> list[str]:
    """predict.py's command line on the fixture's two U-Net folds."""
    return [
        *("--input-dir", images, "--classifiers", *classifiers),
        "--segmenters",
        *(root / "segmentation" / "unet" / f"fold{k}" / "model.pt" for k in range(2)),
        *("--method", "majority", "--classifier-threshold", 0.5),
        *("--segmentation-threshold", segmentation_threshold),
        *("--output", out / "predictions.csv", "--masks-dir", out / "masks"),
        *("--overlays-dir", out / "overlays"),
    ]


def predict(root, images, out, *classifiers, segmentation_threshold=0.5):
    args = predict_args(
        root, images, out, *classifiers, segmentation_threshold=segmentation_threshold
    )
    return run_script("predict.py", *args)


def test_the_job_configures_torch_with_its_threads_on_its_device(results, tmp_path, monkeypatch):
    """predict.py (run in-process) calls configure_torch (the job's threads; cuDNN /
    determinism flags, as in training) with the device it selected and the job's thread count
    (torch's, which the rule's OMP_NUM_THREADS sets), before it loads the models."""
    import brainmri.inference.predict as prediction

    root, images = results
    events = record_torch_setup(monkeypatch, prediction)
    script = load_script("predict.py")
    out = tmp_path / "out"
    args = predict_args(root, images, out, root / "classification" / "resnet10t" / "model.pt")
    assert_main_configures_torch(monkeypatch, script, ["predict.py", *args], events)
    assert len(pd.read_csv(out / "predictions.csv")) == 2


def test_a_leftover_model_folder_is_ignored(results, tmp_path):
    root, images = results
    out = tmp_path / "out"
    result = predict(root, images, out, root / "classification" / "resnet10t" / "model.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert table["file"].tolist() == ["a.png", "b.png"]
    assert table["votes"].max() <= 1  # one classifier voted: the leftover did not
    # The masks come back at each image's own size.
    with Image.open(out / "masks" / "a.png") as mask:
        assert mask.size == (40, 50)
    # Naming the leftover is the only way to use it: then it is read, and refused.
    bad = tmp_path / "bad"
    leftover = root / "classification" / "resnet50_from_an_earlier_config" / "model.pt"
    result = predict(root, images, bad, leftover)
    assert result.returncode == 1 and str(leftover) in result.stderr
    assert not bad.exists()


def test_a_checkpoint_without_its_preprocessing_is_refused(results, tmp_path):
    root, images = results
    old = tmp_path / "old.pt"
    save_checkpoint(old, build_classifier(CLASSIFIER), "classification", CLASSIFIER)
    result = predict(root, images, tmp_path / "out", old)
    assert result.returncode == 1
    assert str(old) in result.stderr and "does not record its preprocessing" in result.stderr


def test_outputs_mirror_relative_paths_masks_are_not_predicted_and_give_a_dice(results, tmp_path):
    """Two scan_1.png in different folders, a .png and a .tif of one stem, and a Kaggle-style
    <slice>_mask beside one image: no output overwrites another, the CSV names files by
    relative path, the mask is not predicted and its image gets a Dice against it."""
    root, _ = results
    scans = tmp_path / "scans"
    rng = np.random.default_rng(1)
    names = ["a/scan_1.png", "b/scan_1.png", "c/x.png", "c/x.tif"]
    for name in names:
        (scans / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(scans / name)
    truth = np.zeros((40, 40), np.uint8)
    truth[10:20, 10:20] = 255
    Image.fromarray(truth).save(scans / "b" / "scan_1_mask.png")
    out = tmp_path / "out"
    result = predict(root, scans, out, root / "classification" / "resnet10t" / "model.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("file")
    assert sorted(table.index) == sorted(names)  # the _mask file is not a scan
    assert table.loc["a/scan_1.png", "mask"] == "a/scan_1.png"
    assert table.loc["c/x.png", "mask"] == "c/x.png.png"
    assert table.loc["c/x.tif", "mask"] == "c/x.tif.png"
    for name in names:
        mask = np.asarray(Image.open(out / "masks" / table.loc[name, "mask"])) > 0
        assert mask.sum() == table.loc[name, "tumor_area_px"]
        assert (out / "overlays" / table.loc[name, "mask"]).is_file()
    # Dice of the predicted mask against the _mask beside it (empty-mask rules), else empty.
    predicted = np.asarray(Image.open(out / "masks" / "b" / "scan_1.png")) > 0
    inter = (predicted & (truth > 0)).sum()
    expected = 2 * inter / (predicted.sum() + (truth > 0).sum())
    assert float(table.loc["b/scan_1.png", "dice"]) == pytest.approx(expected, abs=1e-6)
    assert (table.drop(index="b/scan_1.png")["dice"] == "").all()
    assert table["voters"].eq("resnet10t").all() and table["segmentation_voter"].eq("").all()


def test_a_voter_choice_made_at_other_settings_is_refused(results, tmp_path):
    root, images = results
    choice = tmp_path / "min_pixels.json"
    choice.write_text('{"min_pixels": 3, "threshold": 0.4, "postprocess": {}}')
    out = tmp_path / "out"
    result = run_script(
        "predict.py",
        *("--input-dir", images, "--classifiers", root / "classification/resnet10t/model.pt"),
        *("--segmenters", root / "segmentation/unet/fold0/model.pt", "--method", "majority"),
        *("--classifier-threshold", 0.5, "--segmentation-threshold", 0.5),
        *("--segmentation-voter", choice, "--output", out / "p.csv"),
        *("--masks-dir", out / "m", "--overlays-dir", out / "o"),
    )
    assert result.returncode == 1 and not out.exists()
    assert str(choice) in result.stderr and "threshold 0.4, not 0.5" in result.stderr
