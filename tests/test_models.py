"""Model factories, their built-in input normalisation, config checks and the uint8 data path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from brainmri.errors import ConfigError
from brainmri.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalized,
    build_classifier,
    build_segmenter,
    check_classifier_config,
    check_segmenter_config,
)
from brainmri.tables import gather
from brainmri.training.batches import Batches, targets_to_device, to_device

CLASSIFIER = {"backbone": "resnet10t", "input_size": 64, "pretrained": False}
SEGMENTER = {"arch": "Unet", "encoder": "resnet18", "input_size": 64, "pretrained": False}
CLS_KEY = "classification.backbones.x"
SEG_KEY = "segmentation.architectures.unet"


def test_classifier_has_two_logits_and_normalises_with_the_backbones_statistics():
    torch.manual_seed(0)
    model = build_classifier(CLASSIFIER).eval()
    assert isinstance(model, Normalized)
    x = torch.rand(3, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (3, 2)
    cfg = model.net[0].pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(model.net((x - mean) / std), logits)
    # The statistics travel with the state dict (checkpoints and predict see the same ones).
    assert {"mean", "std"} <= set(model.state_dict())


def test_a_backbone_with_a_conv_head_gets_its_pooled_feature_width():
    model = build_classifier({**CLASSIFIER, "backbone": "mobilenetv3_small_050"}).eval()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2)


def test_segmenter_returns_one_logit_map_of_the_input_size():
    model = build_segmenter({**SEGMENTER, "input_size": 32}).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1, 32, 32)
    assert torch.allclose(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.std.flatten(), torch.tensor(IMAGENET_STD))


def test_valid_configs_pass():
    check_classifier_config(CLASSIFIER, CLS_KEY)
    check_classifier_config({**CLASSIFIER, "backbone": "inception_v3", "input_size": 96}, CLS_KEY)
    check_segmenter_config(SEGMENTER, SEG_KEY)
    check_segmenter_config({**SEGMENTER, "arch": "DeepLabV3Plus", "input_size": 32}, SEG_KEY)


@pytest.mark.parametrize(
    ("check", "settings", "message"),
    [
        (check_classifier_config, {**CLASSIFIER, "backbone": "resnet5O"}, r"x: timm has no model"),
        (
            check_classifier_config,
            {**CLASSIFIER, "backbone": "inception_v3", "input_size": 64},
            r"x: inception_v3 cannot take 64 px",
        ),
        (check_segmenter_config, {**SEGMENTER, "arch": "UNetto"}, r"unet\.arch: .*'UNetto'"),
        (
            check_segmenter_config,
            {**SEGMENTER, "encoder": "resnet9000"},
            r"unet\.encoder: .*'resnet9000'",
        ),
        (
            check_segmenter_config,
            {**SEGMENTER, "input_size": 100},
            r"unet\.input_size: 100 must be a multiple of 32",
        ),
    ],
    ids=["unknown-backbone", "too-small", "unknown-arch", "unknown-encoder", "stride"],
)
def test_config_errors_name_the_key(check, settings, message):
    key = CLS_KEY if check is check_classifier_config else SEG_KEY
    with pytest.raises(ConfigError, match=message):
        check(settings, key)


def test_arrays_stay_uint8_until_the_device_and_are_resized_there():
    images = np.zeros((2, 64, 64, 3), np.uint8)
    images[:, :32] = 255
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[:, 10:30, 10:30] = 1
    x = to_device(images, torch.device("cpu"), 32)
    y = targets_to_device(masks, torch.device("cpu"), 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    assert y.shape == (2, 1, 32, 32) and set(y.unique().tolist()) == {0.0, 1.0}
    assert y[0, 0, 5:15, 5:15].eq(1).all() and y[0, 0, 16:].eq(0).all()
    labels = targets_to_device(np.array([0, 1]), torch.device("cpu"), 32)
    assert labels.dtype == torch.long


def test_gather_follows_source_and_array_index(tmp_path):
    for source, offset in (("lgg", 0), ("btm", 100)):
        (tmp_path / source).mkdir()
        array = np.arange(5, dtype=np.uint8)[:, None, None, None] + offset
        np.save(tmp_path / source / "images.npy", np.broadcast_to(array, (5, 4, 4, 3)).copy())
    rows = pd.DataFrame({"source": ["btm", "lgg", "lgg", "btm"], "array_index": [3, 4, 0, 1]})
    assert gather(tmp_path, rows)[:, 0, 0, 0].tolist() == [103, 4, 0, 101]


def test_a_training_batch_of_one_joins_the_previous_batch():
    """Batch norm cannot train on one image (DeepLabV3+ fails), so training never sees one."""
    batches = Batches(
        np.zeros((17, 8, 8, 3), np.uint8), np.zeros(17, np.int64), 16, torch.device("cpu"), 8
    )
    sizes = [len(x) for x, _ in batches.epoch(np.arange(17), torch.Generator().manual_seed(0))]
    assert sizes == [17]
    assert [len(x) for x, _ in batches.epoch()] == [16, 1]  # evaluation keeps every batch
