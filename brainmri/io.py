"""Atomic file output and small I/O helpers shared by every script."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from brainmri.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and folders: a crashed writer leaves nothing at ``path``. ``path`` must name
    an entry strictly inside its parent folder (not ``.``, ``..`` or a root), and nothing is
    deleted that this call did not create: a folder already at ``path`` is first renamed into a
    fresh trash folder of this call's, which is what gets removed.
    """
    target = Path(path)
    if target.name in ("", ".", ".."):
        raise InputError(f"{path}: not a file or folder name inside an output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            _replace_folder(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _replace_folder(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``, an existing folder: the old one goes into a trash
    folder made here (and comes back if the swap fails), then that trash folder is removed."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, trash / "old")
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(trash / "old", target)
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM (``kill``, a SLURM time limit) raises SystemExit(143) instead of
    killing the process outright, so that ``finally`` clauses (atomic_path's clean-up) run.
    The previous handler comes back after the block. Signals reach only the main thread; in
    another thread the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write pretty, key-sorted JSON atomically (NaN is written as null)."""
    write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike[str], frame: Any, **kwargs: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (no index unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a NumPy array atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class _NoTraceback(logging.Formatter):
    """One line per record: the exception's traceback is left out (it goes to the details file)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


class _FileInFolder(logging.FileHandler):
    """A log file whose folder is made with the file itself, on its first record."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def setup_logging(verbose: bool = False, details: Path | None = None) -> logging.Logger:
    """Log to stderr (the rule's log file) with timestamps, one line per record; ``details``: a
    file that gets the errors with their tracebacks (made on the first error only)."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_NoTraceback(fmt))
    handlers: list[logging.Handler] = [console]
    if details is not None:
        to_file = _FileInFolder(details, mode="w", encoding="utf-8", delay=True)
        to_file.setFormatter(logging.Formatter(fmt))
        to_file.setLevel(logging.ERROR)
        handlers.append(to_file)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers)
    return logging.getLogger("brainmri")


def run_cli(main: Any) -> None:
    """Run a script's main(); turn expected errors into one clear line and exit status 1.
    SIGTERM (a SLURM time limit, ``kill``) and Ctrl-C end the script through its ``finally``
    clauses, so that no temporary output is left behind (status 143 and 130)."""
    try:
        with terminate_as_exit():
            main()
    except (InputError, ValueError, FileNotFoundError, PermissionError) as error:
        name = type(error).__name__
        print(f"error ({name}): {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
