"""The two errors a user sees as one line (bad input files, a bad configuration) and the
did-you-mean hint their messages carry."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InputError(RuntimeError):
    """Bad input data; the message names the file and the problem."""


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates most similar to ``word`` (difflib, case-insensitive), best first."""
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(str(candidate).lower(), str(candidate))
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[c] for c in close]


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """`` (did you mean 'x' or 'y'?)`` for the candidates closest to ``word``, else ``""``."""
    close = close_matches(word, candidates, n)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def error_text(error: BaseException, limit: int | None = 200) -> str:
    """The error's text on one line (at most ``limit`` characters); its type if it has none."""
    text = " ".join(str(error).split())
    return text[:limit] if text else type(error).__name__


def one_line(label: str, error: BaseException) -> str:
    """One line for an input that was skipped: its label, then the error (with the error's type
    unless an InputError, whose message names the file and the problem already)."""
    text = error_text(error, None)
    if not isinstance(error, InputError):
        text = f"{type(error).__name__}: {text}"
    return text if text.startswith(label) else f"{label}: {text}"
