"""Download the two Kaggle datasets with the official ``kaggle`` client, keeping the key secret.

Credentials are looked up the way the client does (``KAGGLE_API_TOKEN``, ``KAGGLE_USERNAME`` +
``KAGGLE_KEY``, ``kaggle.json`` in ``KAGGLE_CONFIG_DIR`` or ``~/.kaggle``); when none is found
we fail with one message naming all three and the offline alternative, before the client is
touched. Any error text that leaves this module has the secrets replaced by ``***``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path

from brainmri.io import InputError

DATASET_SLUGS = {
    "lgg-mri-segmentation": "mateuszbuda/lgg-mri-segmentation",
    "brain-tumor-mri-dataset": "masoudnickparvar/brain-tumor-mri-dataset",
}

log = logging.getLogger(__name__)


class KaggleCredentialsError(InputError):
    """No usable Kaggle credentials."""


def _config_dir() -> Path:
    return Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")


def _secrets() -> list[str]:
    """Every credential value visible to the client (to redact them from messages)."""
    values = [os.environ.get(name, "") for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    config = _config_dir() / "kaggle.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        values.append(str(json.loads(config.read_text()).get("key", "")))
    token_file = _config_dir() / "access_token"
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
    for name in ("kaggle.json", "access_token"):
        path = _config_dir() / name
        if path.is_file():
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning(
                    "Your Kaggle credentials %s are readable by other users; run chmod 600 %s",
                    path,
                    path,
                )
            return str(path)
    raise KaggleCredentialsError(
        "no Kaggle credentials found. Supply them in one of three ways: "
        f'(1) {_config_dir() / "kaggle.json"} with {{"username": ..., "key": ...}} '
        "(chmod 600; KAGGLE_CONFIG_DIR moves the folder), "
        "(2) the environment variables KAGGLE_USERNAME and KAGGLE_KEY, "
        "(3) the environment variable KAGGLE_API_TOKEN. "
        "Offline alternative: download lgg-mri-segmentation.zip and brain-tumor-mri-dataset.zip "
        "elsewhere and run with data.source: local and data.local_dir: <folder with the archives>."
    )


def download_dataset(dataset: str, destination: Path) -> Path:
    """Download ``dataset`` (a key of DATASET_SLUGS) as a zip into ``destination``; return it."""
    slug = DATASET_SLUGS[dataset]
    source = credentials_source()
    log.info("Downloading Kaggle dataset %s (credentials from %s)", slug, source)
    # Import the API class directly: `import kaggle` authenticates (and may exit) on import.
    from kaggle.api.kaggle_api_extended import KaggleApi

    destination.mkdir(parents=True, exist_ok=True)
    try:
        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(slug, path=str(destination), force=True, quiet=True, unzip=False)
    except SystemExit as error:  # the client exits on authentication failures
        raise InputError(
            f"Kaggle client could not authenticate for {slug} (exit {error.code})"
        ) from None
    except Exception as error:
        raise InputError(
            f"Kaggle download of {slug} failed: {type(error).__name__}: {redact(str(error))}. "
            "Without network access use data.source: local (see README)."
        ) from None
    archive = destination / f"{slug.split('/')[1]}.zip"
    if not archive.is_file():
        raise InputError(f"Kaggle download of {slug} produced no {archive}")
    return archive
