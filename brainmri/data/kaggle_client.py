"""Download the two Kaggle datasets with the official ``kaggle`` client, keeping the key secret.

Credentials are looked up the way the client does (``KAGGLE_API_TOKEN``, ``KAGGLE_USERNAME`` +
``KAGGLE_KEY``, ``kaggle.json`` in ``KAGGLE_CONFIG_DIR`` or ``~/.kaggle``); when none is found
we fail with one message naming all three and the offline alternative, before the client is
touched. Any error text that leaves this module has the secrets replaced by ``***``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import stat
from pathlib import Path

from brainmri.errors import InputError

DATASET_SLUGS = {
    "lgg-mri-segmentation": "mateuszbuda/lgg-mri-segmentation",
    "brain-tumor-mri-dataset": "masoudnickparvar/brain-tumor-mri-dataset",
}

log = logging.getLogger(__name__)


class KaggleCredentialsError(InputError):
    """No usable Kaggle credentials."""


def _config_dir() -> Path:
    """The folder the client reads kaggle.json from (KAGGLE_CONFIG_DIR, ~/.kaggle or XDG)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home = Path.home() / ".kaggle"
    if home.exists():
        return home
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "kaggle"


def _secrets() -> list[str]:
    """Every credential value visible to the client (to redact them from messages)."""
    values = [os.environ.get(name, "") for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    users = [os.environ.get("KAGGLE_USERNAME", "")]
    config = _config_dir() / "kaggle.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        content = json.loads(config.read_text())
        values.append(str(content.get("key", "")))
        users.append(str(content.get("username", "")))
    # HTTP basic auth sends base64("username:key"): redact that form too.
    values += [
        base64.b64encode(f"{user}:{key}".encode()).decode()
        for user in users
        for key in list(values)
        if user and key
    ]
    for token_file in (_config_dir() / "access_token", Path.home() / ".kaggle" / "access_token"):
        with contextlib.suppress(OSError):
            values.append(token_file.read_text().strip())
    return [value for value in values if len(value) >= 4]


def redact(text: str) -> str:
    """``text`` with every Kaggle secret replaced by ``***``."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def credentials_source() -> str:
    """Name where the credentials come from; raise KaggleCredentialsError if there are none."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    for path in (_config_dir() / "kaggle.json", Path.home() / ".kaggle" / "access_token"):
        if path.is_file():
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning(
                    "Your Kaggle credentials %s are readable by other users; run chmod 600 %s",
                    path,
                    path,
                )
            if path.name == "kaggle.json":
                _check_kaggle_json(path)
            return str(path)
    raise KaggleCredentialsError(
        "no Kaggle credentials found. Supply them in one of three ways: "
        '(1) the file ~/.kaggle/kaggle.json with {"username": ..., "key": ...} '
        f"(looked for at {_config_dir() / 'kaggle.json'}; chmod 600; KAGGLE_CONFIG_DIR moves it), "
        "(2) the environment variables KAGGLE_USERNAME and KAGGLE_KEY, "
        "(3) the environment variable KAGGLE_API_TOKEN. "
        "Offline alternative: download lgg-mri-segmentation.zip and brain-tumor-mri-dataset.zip "
        "elsewhere and run with data.source: local and data.local_dir: <folder with the archives>."
    )


def _check_kaggle_json(path: Path) -> None:
    """kaggle.json must be a JSON object with a username and a key (never echoed)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise KaggleCredentialsError(f"{path}: not readable as JSON") from None
    if not isinstance(content, dict) or not content.get("username") or not content.get("key"):
        raise KaggleCredentialsError(f'{path}: expected {{"username": ..., "key": ...}}')


def download_dataset(dataset: str, destination: Path) -> Path:
    """Download ``dataset`` (a key of DATASET_SLUGS) as a zip into ``destination``; return it."""
    slug = DATASET_SLUGS[dataset]
    source = credentials_source()
    log.info("Downloading Kaggle dataset %s (credentials from %s)", slug, source)
    destination.mkdir(parents=True, exist_ok=True)
    printed = io.StringIO()  # the client prints; keep it out of stdout and redact it
    try:
        with contextlib.redirect_stdout(printed):
            # Importing the package authenticates once already (kaggle/__init__.py) and may
            # print: import only now that credentials exist, with stdout captured.
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            # Verbose mode (VERBOSE=1) would print request headers, i.e. the credentials.
            api.args = [arg for arg in api.args if arg not in ("--verbose", "-v")]
            api.authenticate()
            api.dataset_download_files(
                slug, path=str(destination), force=True, quiet=True, unzip=False
            )
    except SystemExit as error:  # the client exits on authentication failures
        raise InputError(
            f"Kaggle client could not authenticate for {slug} (exit {error.code}); "
            "check the credentials (see README) or use data.source: local"
        ) from None
    except Exception as error:
        raise InputError(
            f"Kaggle download of {slug} failed: {type(error).__name__}: {redact(str(error))}. "
            "Without network access use data.source: local (see README)."
        ) from None
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.info("kaggle: %s", redact(line))
    archive = destination / f"{slug.split('/')[1]}.zip"
    if not archive.is_file():
        raise InputError(f"Kaggle download of {slug} produced no {archive}")
    return archive
