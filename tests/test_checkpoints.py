"""Safe loading everywhere (checkpoints, resume state, weights) and the offline weight cache."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import run_script

from brainmri.errors import InputError
from brainmri.models import (
    WeightsError,
    build_classifier,
    build_segmenter,
    load_checkpoint,
    load_weights_file,
    safe_torch_load,
    save_checkpoint,
)
from brainmri.training.resume import load_resume_state

CLASSIFIER = {"backbone": "resnet10t", "name": "resnet10t", "input_size": 64, "pretrained": False}
SEGMENTER = {
    "name": "unet",
    "arch": "Unet",
    "encoder": "resnet18",
    "input_size": 64,
    "pretrained": False,
}


class Trap:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def booby_trapped(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save(
        {
            "format": "brainmri-checkpoint-v2",
            "task": "classification",
            "settings": CLASSIFIER,
            "state_dict": {},
            "input_size": 64,
            "payload": Trap(str(marker)),
        },
        path,
    )
    return path, marker


def test_every_loader_refuses_a_pickled_callable(booby_trapped, tmp_path, caplog):
    path, marker = booby_trapped
    with pytest.raises(InputError, match="refusing to load"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="refusing to load"):
        safe_torch_load(path)
    resume = tmp_path / "resume"
    resume.mkdir()
    os.replace(path, resume / "state.pt")
    assert load_resume_state(resume, "digest") is None
    assert "refusing to load" in caplog.text
    with pytest.raises(WeightsError):
        load_weights_file(resume / "state.pt", "timm", "resnet10t")
    converted = tmp_path / "weights.safetensors"
    result = run_script(
        "download_weights.py",
        "--library",
        "timm",
        "--name",
        "resnet10t",
        "--output",
        converted,
        "--from-file",
        resume / "state.pt",
    )
    assert result.returncode == 1 and "refusing to load" in result.stderr
    assert not converted.exists()
    assert not marker.exists()


def test_predict_refuses_a_booby_trapped_checkpoint(booby_trapped, tmp_path):
    import numpy as np
    from PIL import Image

    path, marker = booby_trapped
    segmenter = tmp_path / "unet" / "fold0" / "model.pt"
    save_checkpoint(
        segmenter,
        build_segmenter(SEGMENTER),
        "segmentation",
        SEGMENTER,
        preprocessing={"array_size": 64},
    )
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(images / "a.png")
    out = tmp_path / "out"
    result = run_script(
        "predict.py",
        *("--input-dir", images, "--classifiers", path, "--segmenters", segmenter),
        *("--method", "majority", "--classifier-threshold", 0.5),
        *("--segmentation-threshold", 0.5, "--output", out / "predictions.csv"),
        *("--masks-dir", out / "masks", "--overlays-dir", out / "overlays"),
    )
    assert result.returncode == 1
    assert "refusing to load" in result.stderr
    assert not marker.exists()
    assert not out.exists()


def test_checkpoint_round_trip(tmp_path):
    model = build_classifier(CLASSIFIER)
    save_checkpoint(tmp_path / "c.pt", model, "classification", CLASSIFIER, epoch=3)
    loaded, checkpoint = load_checkpoint(tmp_path / "c.pt")
    assert checkpoint["epoch"] == 3 and checkpoint["input_size"] == 64
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x), loaded(x))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c.pt", build_classifier(CLASSIFIER), "classification", CLASSIFIER)
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="unreadable or truncated"):
        load_checkpoint(tmp_path / "c.pt")


def test_weight_cache_round_trip_offline(tmp_path):
    """A stand-in for downloaded weights: a random model's state dict through --from-file."""
    import timm

    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "downloaded.pth")
    cache = tmp_path / "weights" / "timm" / "resnet10t.safetensors"
    run_script(
        "download_weights.py",
        "--library",
        "timm",
        "--name",
        "resnet10t",
        "--output",
        cache,
        "--from-file",
        tmp_path / "downloaded.pth",
        check=True,
    )
    model = build_classifier({**CLASSIFIER, "pretrained": True}, str(cache))
    backbone = model.net[0].state_dict()
    assert all(torch.equal(backbone[k], v) for k, v in source.state_dict().items() if k in backbone)


def test_missing_weights_name_the_model_and_the_way_to_fix_it(tmp_path):
    missing = tmp_path / "weights" / "timm" / "resnet10t.safetensors"
    with pytest.raises(WeightsError) as error:
        build_classifier({**CLASSIFIER, "pretrained": True}, str(missing))
    message = str(error.value)
    assert "resnet10t" in message and str(missing) in message and "--from-file" in message
    result = run_script(
        "download_weights.py",
        "--library",
        "timm",
        "--name",
        "resnet10t",
        "--output",
        missing,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1 and "resnet10t" in result.stderr
    assert not missing.exists()
