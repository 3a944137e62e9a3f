"""The files the report reads, by role: the report rule's named inputs (rules/report.smk,
``report_files``), passed to make_report.py as one JSON mapping. The report reads these files
and no other: no results-directory paths are rebuilt, nothing is globbed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brainmri.errors import InputError

# Roles whose files may be absent: Snakemake's benchmark files are not inputs of the report (a
# deleted one must not rerun its job), so a job without one is left out of the run-time table.
OPTIONAL_ROLES = frozenset({"benchmarks"})


class ReportFiles:
    """role -> file, or role -> {name: file} (a model, ``arch/foldK``, a benchmark's job), or
    role -> [files] (the training jobs' device.json)."""

    def __init__(self, files: dict[str, Any]) -> None:
        if not isinstance(files, dict):
            raise InputError("report inputs: expected a JSON object role -> file(s)")
        self.files = files

    @classmethod
    def from_json(cls, text: str) -> ReportFiles:
        try:
            return cls(json.loads(text))
        except json.JSONDecodeError as error:
            raise InputError(f"report inputs: not JSON ({error})") from None

    def path(self, role: str, name: str | None = None) -> Path:
        """The one file of ``role`` (of ``name`` within it)."""
        entry = self.files.get(role)
        if name is not None:
            entry = entry.get(name) if isinstance(entry, dict) else None
        if not isinstance(entry, str):
            given = f" for {name}" if name is not None else ""
            raise InputError(f"report inputs: no {role} file given{given}")
        return Path(entry)

    def named(self, role: str) -> dict[str, Path]:
        """Every ``{name: file}`` of ``role``, in the given order."""
        entry = self.files.get(role, {})
        if not isinstance(entry, dict):
            raise InputError(f"report inputs: {role} must map names to files")
        return {name: self.path(role, name) for name in entry}

    def listed(self, role: str) -> list[Path]:
        entry = self.files.get(role, [])
        if not isinstance(entry, list) or not all(isinstance(p, str) for p in entry):
            raise InputError(f"report inputs: {role} must be a list of files")
        return [Path(p) for p in entry]

    def _leaves(self) -> Iterator[tuple[str, Path]]:
        for role, entry in self.files.items():
            if isinstance(entry, dict):
                yield from ((f"{role} {name}", self.path(role, name)) for name in entry)
            elif isinstance(entry, list):
                yield from ((role, path) for path in self.listed(role))
            else:
                yield role, self.path(role)

    def check(self) -> None:
        """Every given file exists, before anything is read or written."""
        for role, path in self._leaves():
            if role.split(" ")[0] not in OPTIONAL_ROLES and not path.exists():
                raise InputError(
                    f"{path}: missing report input ({role}); run the workflow up to this step"
                )
