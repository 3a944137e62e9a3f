"""Guards for what comes from someone else's files: names that become output paths, symlinks
that point out of an input folder, text that lands in a CSV, and two runs writing one folder.

Prediction meets files nobody here made (a hospital's DICOM export, a colleague's NIfTI folder).
Each guard refuses with :class:`InputError`, one line naming the input and the reason, so that a
batch can skip that input and go on; none of them touches anything outside the output folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainmri.errors import InputError, one_line

MAX_NAME_BYTES = 255  # a file name on every common file system
# A spreadsheet runs a cell starting with these as a formula (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_name(name: str, what: str = "name") -> str:
    """``name`` if it can be a single file or folder name inside an output folder; else
    InputError: empty, ``.``, ``..``, a path separator, a leading dot (hidden, or a way up),
    control characters, or longer than the file system allows."""
    reason = None
    if not isinstance(name, str) or not name:
        reason = "is empty"
    elif name in (".", ".."):
        reason = "is a way to the folder itself or its parent"
    elif "/" in name or "\\" in name:
        reason = "holds a path separator"
    elif name.startswith("."):
        reason = "starts with a dot"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        reason = "holds a control character"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        reason = f"is longer than {MAX_NAME_BYTES} bytes"
    if reason:
        raise InputError(f"{what} {name!r} {reason}: it cannot name an output; rename the input")
    return name


def check_inside(path: Path, folder: Path) -> Path:
    """``path`` if it really lies in ``folder`` once symlinks are followed; else InputError (a
    symlink in an input folder must not pull in a file from elsewhere)."""
    real, home = path.resolve(), folder.resolve()
    if real != home and home not in real.parents:
        raise InputError(
            f"{path}: a symlink to {real}, outside the input folder {folder}; copy the file in "
            "instead"
        )
    return path


def csv_safe(value: Any) -> Any:
    """A cell written from input-derived text, neutralised so that a spreadsheet shows it as
    text: a leading ``= + - @``, tab or carriage return gets a ``'`` before it."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_safe_frame(frame: Any) -> Any:
    """A copy of the DataFrame with every text cell passed through :func:`csv_safe`."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or str(out[column].dtype).startswith("str"):
            out[column] = out[column].map(csv_safe)
    return out


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (a hidden ``.<name>.lock`` beside it, removed at the
    end) for the block; a second writer of the same output fails at once in one line instead of
    the two mixing their files. Without ``fcntl`` (not POSIX) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = output.parent / f".{output.name}.lock"
    handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise InputError(
            f"{output}: another prediction is writing it now; wait for it to end or choose "
            "another output folder"
        ) from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a writer that opens it later fails
        os.close(handle)  # closing releases the lock


def skip(log: logging.Logger, label: str, error: Exception) -> str:
    """Log one input's failure in one line (its traceback only in the details log, and only when
    it is not a plain refusal) and return that line for the CSV and the summary."""
    message = one_line(label, error)
    log.error("Skipping %s", message, exc_info=not isinstance(error, InputError))
    return message
