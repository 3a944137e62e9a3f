"""Kaggle acquisition: the official client against a stand-in server on 127.0.0.1.

The client (kaggle 2.2.5 / kagglesdk) picks its endpoint from ``kagglesdk.kaggle_env``; with
``--local`` in ``KaggleApi.args`` it talks to ``_env_to_endpoint[KaggleEnv.LOCAL]``, which the
tests point at a ``http.server`` on an ephemeral port of 127.0.0.1. Everything else (credential
loading, authentication, the DownloadDataset RPC, the streamed download) is the client's own code.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import runpy
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from brainmri.data import kaggle_client
from brainmri.data.synthetic import write_btm_archive
from brainmri.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SECRET = "k3y-0123456789abcdef-SECRET"
USER = "brainmri-tester"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No Kaggle credentials anywhere: empty HOME and config folder, no KAGGLE_* variables."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name in ("VERBOSE", "VERBOSE_OUTPUT"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    return home


class StandIn(http.server.BaseHTTPRequestHandler):
    """Serves DownloadDataset like api.kaggle.com (a zip body), or an error echoing the key."""

    archive: ClassVar[bytes] = b""
    requests: ClassVar[list[dict]] = []
    fail_with_key: ClassVar[bool] = False

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        StandIn.requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization", "")}
        )
        if StandIn.fail_with_key:
            # A misbehaving server (or proxy) that echoes the credentials in its error.
            payload = json.dumps({"code": 403, "message": f"key {SECRET} is not allowed"})
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(StandIn.archive)))
        self.end_headers()
        self.wfile.write(StandIn.archive)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def standin(monkeypatch, tmp_path, clean_env):
    """A stand-in Kaggle API on 127.0.0.1 serving a synthetic brain-tumor-mri-dataset.zip."""
    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk import kaggle_env

    write_btm_archive(tmp_path / "served.zip", images_per_class=3, seed=0)
    StandIn.archive = (tmp_path / "served.zip").read_bytes()
    StandIn.requests = []
    StandIn.fail_with_key = False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.LOCAL, endpoint)
    monkeypatch.setattr(KaggleApi, "args", ["--local"])
    monkeypatch.setattr(KaggleApi, "config", str(clean_env / ".kaggle" / "kaggle.json"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    yield StandIn
    server.shutdown()
    server.server_close()


def run_fetch_in_process(tmp_path: Path, monkeypatch) -> None:
    """Run workflow_scripts/fetch_dataset.py's main() in this process (so the stand-in applies)."""
    argv = [
        "fetch_dataset.py",
        "--dataset=brain-tumor-mri-dataset",
        "--source=kaggle",
        "--local-dir=",
        "--synthetic={}",
        '--extraction={"max_total_bytes": 100000000, "max_members": 1000}',
        "--seed=1",
        f"--out-dir={tmp_path / 'results' / 'raw' / 'brain-tumor-mri-dataset'}",
        f"--checksums={tmp_path / 'results' / 'raw' / 'brain-tumor-mri-dataset.sha256.tsv'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    script = runpy.run_path(str(REPO / "workflow_scripts" / "fetch_dataset.py"))
    script["main"]()


def all_written_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_download_through_the_real_client_is_extracted_and_checksummed(
    standin, tmp_path, monkeypatch, capfd, caplog
):
    caplog.set_level(logging.DEBUG)
    run_fetch_in_process(tmp_path, monkeypatch)
    (request,) = standin.requests
    assert request["path"] == "/api/v1/datasets.DatasetApiService/DownloadDataset"
    assert request["body"]["ownerSlug"] == "masoudnickparvar"
    assert request["body"]["datasetSlug"] == "brain-tumor-mri-dataset"
    # The client authenticated with the legacy key (HTTP basic auth).
    assert request["auth"] == "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    out = tmp_path / "results" / "raw" / "brain-tumor-mri-dataset"
    assert sorted(p.name for p in (out / "Training").iterdir()) == [
        "glioma",
        "meningioma",
        "notumor",
        "pituitary",
    ]
    rows = (out.parent / "brain-tumor-mri-dataset.sha256.tsv").read_text().splitlines()
    assert rows[1].startswith(f"brain-tumor-mri-dataset.zip\t{len(standin.archive)}\t")
    assert len(rows) == 2 + 12 + 1  # header, zip, files, and the source record
    # Errors about these files will name the Kaggle dataset, not the extracted copy.
    source = (out / ".brainmri-source").read_text().strip()
    zip_name = rows[1].split("\t")[0]
    assert source == f"Kaggle dataset masoudnickparvar/brain-tumor-mri-dataset ({zip_name})"
    # The key never appears in any written file, in stdout/stderr or in the log records.
    captured = capfd.readouterr()
    encoded = base64.b64encode(f"{USER}:{SECRET}".encode())
    for blob in (all_written_bytes(tmp_path / "results"), (captured.out + captured.err).encode()):
        assert SECRET.encode() not in blob and encoded not in blob
    assert SECRET not in caplog.text
    assert not list(tmp_path.glob("results/raw/tmp*"))  # the downloaded zip was a temporary


def test_server_error_echoing_the_key_is_redacted(standin, tmp_path, monkeypatch, capfd):
    standin.fail_with_key = True
    with pytest.raises(InputError) as caught:
        run_fetch_in_process(tmp_path, monkeypatch)
    message = str(caught.value)
    assert "masoudnickparvar/brain-tumor-mri-dataset failed" in message
    assert "***" in message and SECRET not in message
    assert "data.source: local" in message
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    assert not (tmp_path / "results" / "raw" / "brain-tumor-mri-dataset").exists()
    assert SECRET.encode() not in all_written_bytes(tmp_path)


def test_missing_credentials_fail_before_the_client_with_one_clear_line(tmp_path, clean_env):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(clean_env)}
    out = tmp_path / "raw" / "lgg-mri-segmentation"
    command = [
        sys.executable,
        str(REPO / "workflow_scripts" / "fetch_dataset.py"),
        "--dataset=lgg-mri-segmentation",
        "--source=kaggle",
        "--local-dir=",
        f"--out-dir={out}",
        f"--checksums={tmp_path / 'raw' / 'lgg.tsv'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error (KaggleCredentialsError): no Kaggle credentials found")
    for way in ("~/.kaggle/kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        assert way in line
    assert "data.source: local" in line and "data.local_dir" in line
    assert not out.exists() and not (tmp_path / "raw" / "lgg.tsv").exists()
    # The client was never imported: importing it creates ~/.kaggle or ~/.config/kaggle.
    assert list(clean_env.iterdir()) == []


def test_credentials_sources_and_permission_warning(clean_env, monkeypatch, caplog):
    with pytest.raises(kaggle_client.KaggleCredentialsError):
        kaggle_client.credentials_source()
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok-abcdef")
    assert kaggle_client.credentials_source() == "KAGGLE_API_TOKEN"
    monkeypatch.delenv("KAGGLE_API_TOKEN")
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    assert kaggle_client.credentials_source() == "KAGGLE_USERNAME/KAGGLE_KEY"
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")

    config = clean_env / ".kaggle" / "kaggle.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"username": USER, "key": SECRET}))
    config.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert kaggle_client.credentials_source() == str(config)
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text
    caplog.clear()
    config.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        kaggle_client.credentials_source()
    assert caplog.text == ""
    assert kaggle_client.redact(f"oops {SECRET} leaked") == "oops *** leaked"

    config.write_text(json.dumps({"username": USER, "kee": SECRET}))
    with pytest.raises(kaggle_client.KaggleCredentialsError, match="expected") as caught:
        kaggle_client.credentials_source()
    assert SECRET not in str(caught.value)
