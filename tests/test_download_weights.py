"""download_weights: the real cache path in its messages, and no hub retries when offline."""

from __future__ import annotations

import importlib.util
import socket

import pytest
from helpers import SCRIPTS, run_script

from brainmri.errors import InputError


@pytest.fixture
def download_weights():
    path = SCRIPTS / "download_weights.py"
    spec = importlib.util.spec_from_file_location("download_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline(monkeypatch):
    """No connection can be made; the hub clients must not be entered at all."""

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    def hub_entered(*args, **kwargs):
        raise AssertionError("the hub client (and its retries) was entered while offline")

    import segmentation_models_pytorch as smp
    import timm

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(timm, "create_model", hub_entered)
    monkeypatch.setattr(smp.encoders, "get_encoder", hub_entered)


@pytest.mark.parametrize("library, name", [("timm", "resnet10t"), ("smp", "resnet18")])
def test_offline_fails_before_the_hub_with_the_real_path(
    download_weights, offline, tmp_path, library, name
):
    output = tmp_path / "weights" / library / f"{name}.safetensors"
    with pytest.raises(InputError) as error:
        download_weights.fetch(library, name, output)
    message = str(error.value)
    assert "no network" in message and "huggingface.co:443 unreachable" in message
    assert str(output) in message and f"snakemake {output}" in message
    assert "<output>" not in message and "\n" not in message


def test_hub_errors_name_the_real_path(download_weights, monkeypatch, tmp_path):
    import timm

    def missing(*args, **kwargs):
        raise RuntimeError("Unknown model (no_such_net)")

    monkeypatch.setattr(download_weights, "hub_unreachable", lambda: None)
    monkeypatch.setattr(timm, "create_model", missing)
    output = tmp_path / "no_such_net.safetensors"
    with pytest.raises(InputError) as error:
        download_weights.fetch("timm", "no_such_net", output)
    assert "Unknown model" in str(error.value) and f"snakemake {output}" in str(error.value)
    assert "<output>" not in str(error.value)


def test_probe_respects_the_endpoint_and_offline_mode(download_weights, monkeypatch):
    calls = []

    def record(address, timeout):
        calls.append((address, timeout))
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", record)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "mirror.example:8080 unreachable" in download_weights.hub_unreachable()
    assert calls == [(("mirror.example", 8080), download_weights.PROBE_TIMEOUT_S)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cache only: the hub client decides, no probe
    assert download_weights.hub_unreachable() is None and len(calls) == 1


def test_cli_offline_is_one_line_naming_the_output(tmp_path):
    output = tmp_path / "weights" / "timm" / "resnet10t.safetensors"
    # An endpoint on a closed local port: the probe fails at once, as on an offline machine.
    result = run_script(
        "download_weights.py",
        "--library",
        "timm",
        "--name",
        "resnet10t",
        "--output",
        output,
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""},
    )
    assert result.returncode == 1
    assert "127.0.0.1:9 unreachable" in result.stderr and str(output) in result.stderr
    assert "Traceback" not in result.stderr and not output.exists()
