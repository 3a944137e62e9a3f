"""encoder_depth of a segmentation architecture entry: smp gets it (with matching decoder
channels), the checkpoint carries it, predict and predict_volume rebuild the same network, and
a depth that cannot work is a one-line error naming the key."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import REPO, run_script
from PIL import Image

from brainmri.config import schema_errors
from brainmri.errors import ConfigError
from brainmri.models import (
    build_classifier,
    build_segmenter,
    check_segmenter_config,
    depth_options,
    load_checkpoint,
    save_checkpoint,
)
from brainmri.training.losses import segmentation_loss

SEGMENTER = {"name": "unet", "arch": "Unet", "encoder": "resnet18", "input_size": 32}
DEPTH_4 = {**SEGMENTER, "encoder_depth": 4, "pretrained": False, "dice_smooth": 1.0}
KEY = "segmentation.architectures.unet"


def test_a_depth_4_unet_trains_saves_and_reloads_to_the_same_output(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter(DEPTH_4)
    assert len(model.net.decoder.blocks) == 4  # decoder_channels (256, 128, 64, 32)
    assert len(model.net.encoder.out_channels) == 5  # the input + 4 stages
    images = torch.rand(4, 3, 32, 32)
    masks = (torch.rand(4, 1, 32, 32) > 0.7).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = segmentation_loss(DEPTH_4)(model.train()(images), masks)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    save_checkpoint(tmp_path / "m.pt", model, "segmentation", DEPTH_4, epoch=1)
    loaded, checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert checkpoint["settings"]["encoder_depth"] == 4
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # The depth is what makes the weights fit: a depth-5 network refuses them.
    with pytest.raises(RuntimeError, match=r"Unexpected key|Missing key|size mismatch"):
        build_segmenter({**DEPTH_4, "encoder_depth": 5}).load_state_dict(model.state_dict())


def test_decoders_with_one_width_per_stage_get_that_many_widths_others_only_the_depth():
    assert depth_options(SEGMENTER) == {}  # absent: smp's default, as before
    assert depth_options(DEPTH_4) == {"encoder_depth": 4, "decoder_channels": (256, 128, 64, 32)}
    assert depth_options({**DEPTH_4, "arch": "DeepLabV3Plus", "encoder_depth": 3}) == {
        "encoder_depth": 3
    }
    check_segmenter_config({**DEPTH_4, "arch": "DeepLabV3Plus"}, KEY)
    check_segmenter_config({**DEPTH_4, "arch": "UnetPlusPlus", "encoder_depth": 3}, KEY)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"encoder_depth": 6}, rf"^{KEY}\.encoder_depth: 6 must be an integer from 3 to 5$"),
        ({"encoder_depth": "4"}, rf"^{KEY}\.encoder_depth: '4' must be an integer"),
        (
            {"arch": "FPN"},
            rf"^{KEY}\.encoder_depth: FPN does not support it \(its output size would follow",
        ),
        ({"arch": "PSPNet"}, rf"^{KEY}\.encoder_depth: PSPNet does not support it"),
    ],
    ids=["too-deep", "not-an-integer", "fpn", "pspnet"],
)
def test_a_bad_depth_is_one_line_naming_the_key(changes, message):
    settings = {**DEPTH_4, **changes}
    for check in (lambda: check_segmenter_config(settings, KEY), lambda: build_segmenter(settings)):
        with pytest.raises(ConfigError, match=message) as caught:
            check()
        assert "\n" not in str(caught.value)


def test_the_schema_takes_depths_3_to_5_in_an_architecture_entry():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())

    def errors(depth):
        changed = copy.deepcopy(config)
        changed["segmentation"]["architectures"][0]["encoder_depth"] = depth
        return schema_errors(changed, schema)

    assert errors(3) == [] and errors(5) == []
    (error,) = errors(2)
    assert error.startswith("segmentation.architectures[0].encoder_depth")
    assert len(errors(4.5)) == 1


@pytest.fixture(scope="module")
def depth_4_models(tmp_path_factory):
    """A classifier and a depth-4 U-Net (input 32, data size 32) that call every slice and
    every pixel tumor: a known answer for the prediction scripts."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cls = {"backbone": "resnet10t", "name": "resnet10t", "input_size": 32, "pretrained": False}
    classifier, segmenter = build_classifier(cls), build_segmenter(DEPTH_4)
    with torch.no_grad():
        classifier.net[1][-1].weight.zero_()
        classifier.net[1][-1].bias.copy_(torch.tensor([-5.0, 5.0]))
        segmenter.net.segmentation_head[0].weight.zero_()
        segmenter.net.segmentation_head[0].bias.fill_(5.0)
    preprocessing = {"array_size": 32}
    save_checkpoint(root / "c.pt", classifier, "classification", cls, preprocessing=preprocessing)
    save_checkpoint(root / "s.pt", segmenter, "segmentation", DEPTH_4, preprocessing=preprocessing)
    return root / "c.pt", root / "s.pt"


def test_predict_and_predict_volume_rebuild_the_depth_4_model_from_its_checkpoint(
    depth_4_models, tmp_path
):
    classifier, segmenter = depth_4_models
    rng = np.random.default_rng(0)
    folder = tmp_path / "TCGA_CS_0001_20000101"
    folder.mkdir()
    for k in range(1, 4):
        image = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{folder.name}_{k}.tif")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(images / "a.png")
    out = tmp_path / "out"
    rule = ("--method", "majority", "--classifier-threshold", 0.5)
    predicted = run_script(
        "predict.py",
        *("--input-dir", images, "--classifiers", classifier, "--segmenters", segmenter),
        *rule,
        *("--segmentation-threshold", 0.5, "--output", out / "predictions.csv"),
        *("--masks-dir", out / "masks", "--overlays-dir", out / "overlays"),
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert table["tumor_area_px"].tolist() == [40 * 40]  # every pixel: the known answer
    volumes = run_script(
        "predict_volume.py",
        *("--inputs", folder, "--classifiers", classifier, "--segmenters", segmenter),
        *rule,
        *("--segmentation-threshold", 0.5),
        *("--csv", out / "volumes.csv", "--patients-dir", out / "patients"),
    )
    assert volumes.returncode == 0, volumes.stderr[-3000:]
    row = pd.read_csv(out / "volumes.csv", keep_default_na=False).iloc[0]
    assert row["error"] == "" and int(row["tumor_voxels"]) == 3 * 40 * 40
