"""A killed Snakemake run's lock is removed by the next run, a live run's lock never."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from helpers import REPO

from brainmri.runlock import LIVE_FILE, claim_workdir, held_locks

HOLDER = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from brainmri.runlock import claim_workdir
handle, removed, others = claim_workdir(sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


def stale_lock(folder):
    locks = folder / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("/data/x\n")
    (locks / "0.output.lock").write_text("/results/y\n")


def test_no_lock_no_removal(tmp_path):
    handle, removed, others = claim_workdir(tmp_path / ".snakemake")
    assert (removed, others) == ([], False)
    assert (tmp_path / ".snakemake" / LIVE_FILE).exists()
    handle.close()


def test_a_stale_lock_is_removed(tmp_path):
    folder = tmp_path / ".snakemake"
    stale_lock(folder)
    handle, removed, others = claim_workdir(folder)
    assert removed == ["0.input.lock", "0.output.lock"] and not others
    assert held_locks(folder) == []
    handle.close()


def test_the_lock_of_a_live_run_is_kept_until_that_run_is_killed(tmp_path):
    folder = tmp_path / ".snakemake"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        stale_lock(folder)  # the live run's own lock
        handle, removed, others = claim_workdir(folder)
        assert removed == [] and others
        assert held_locks(folder) == ["0.input.lock", "0.output.lock"]
        handle.close()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    time.sleep(0.1)
    handle, removed, others = claim_workdir(folder)  # the holder is dead: its lock is stale
    assert removed == ["0.input.lock", "0.output.lock"] and not others
    handle.close()


def test_two_live_runs_share_the_liveness_lock(tmp_path):
    first, _, _ = claim_workdir(tmp_path)
    second, removed, others = claim_workdir(tmp_path)  # another open file: another "process"
    assert others and removed == []
    first.close()
    second.close()
