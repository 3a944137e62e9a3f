"""Recovering from a killed Snakemake run: remove its stale lock, and only that.

Snakemake locks the files a run will write (``.snakemake/locks/``) and removes the lock when it
ends. A run that is killed (SIGKILL, a closed terminal, a lost node, a power cut) leaves the
lock behind, and the next run stops with ``LockException ... --unlock``. Snakemake cannot tell a
stale lock from a live one; this module can, for runs of this workflow: every Snakemake process
that reads it (rules/common.smk, main process only) holds a shared ``flock`` on
``.snakemake/brainmri-live.lock`` for as long as it lives. The kernel releases that lock when
the process dies, however it dies. So when a new run can take the lock exclusively, no run of
this workflow is alive in this folder, and any Snakemake lock is stale: it is removed, and the
plain rerun proceeds (incomplete jobs are redone, training resumes from its last epoch). When
another run is alive, nothing is removed and Snakemake's own check decides.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO

LIVE_FILE = "brainmri-live.lock"


def claim_workdir(snakemake_dir: str | os.PathLike[str]) -> tuple[IO[str] | None, list[str], bool]:
    """Hold this process's liveness lock; remove Snakemake's locks if no other run is alive.

    Returns ``(handle, removed, others_alive)``: keep ``handle`` open for the life of the
    process (closing it releases the lock); ``removed`` names the stale lock files deleted;
    ``others_alive`` is true when another run of the workflow holds the liveness lock.
    Without ``fcntl`` (not POSIX) nothing is done.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None, [], False
    folder = Path(snakemake_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LIVE_FILE, "a", encoding="utf-8")  # noqa: SIM115 - held open
    removed: list[str] = []
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        others_alive = True
    else:
        others_alive = False
        locks = folder / "locks"
        if locks.is_dir():
            removed = sorted(path.name for path in locks.iterdir())
            shutil.rmtree(locks, ignore_errors=True)
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle, removed, others_alive


def held_locks(snakemake_dir: str | os.PathLike[str]) -> list[str]:
    """The Snakemake lock files present in ``snakemake_dir/locks``."""
    locks = Path(snakemake_dir) / "locks"
    return sorted(path.name for path in locks.iterdir()) if locks.is_dir() else []
