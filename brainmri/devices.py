"""Device choice and GPU placement on multi-GPU workstations.

Snakemake gives a job no GPU index, so with ``--resources gpu=N`` every job would land on GPU 0.
Unless a scheduler already set ``CUDA_VISIBLE_DEVICES`` (SLURM does), a job claims a free GPU by
taking an exclusive ``flock`` on ``<lock dir>/gpu<index>.lock`` and holds it for its lifetime;
the kernel releases the lock when the process ends, however it ends.

Several jobs per GPU: with ``BRAINMRI_JOBS_PER_GPU=K`` (the workflow sets it from the config key
``gpu_jobs_per_device``) each GPU has K slots, ``gpu<i>.lock`` and ``gpu<i>.slot<k>.lock`` for
k = 1..K-1, and ``--resources gpu=N`` counts slots (N = GPUs x K). Jobs take the first free slot
in the order slot 0 of every GPU, then slot 1 of every GPU, ..., so they spread over the GPUs
before they share one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

import torch

log = logging.getLogger(__name__)

_held_locks: list[IO] = []


def lock_dir() -> Path:
    return Path(
        os.environ.get("BRAINMRI_GPU_LOCK_DIR")
        or Path(tempfile.gettempdir()) / "brainmri-gpu-locks"
    )


def jobs_per_gpu() -> int:
    """Job slots per GPU: ``$BRAINMRI_JOBS_PER_GPU`` (default 1)."""
    text = os.environ.get("BRAINMRI_JOBS_PER_GPU", "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"BRAINMRI_JOBS_PER_GPU={text!r}: must be a positive integer")
    return value


def slot_order(count: int, per_gpu: int) -> list[tuple[int, int]]:
    """(gpu, slot) pairs in the order jobs take them: slot 0 of every GPU first."""
    return [(index, slot) for slot in range(per_gpu) for index in range(count)]


def claim_gpu(
    count: int,
    directory: Path | None = None,
    timeout: float = 3600.0,
    poll: float = 2.0,
    per_gpu: int | None = None,
) -> int:
    """Index of a GPU with a job slot no other job of this workflow holds; wait while all
    ``count x per_gpu`` slots (default per_gpu: :func:`jobs_per_gpu`) are taken."""
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    per_gpu = per_gpu or jobs_per_gpu()
    deadline = time.monotonic() + timeout
    while True:
        for index, slot in slot_order(count, per_gpu):
            name = f"gpu{index}.lock" if slot == 0 else f"gpu{index}.slot{slot}.lock"
            handle = open(directory / name, "a+")  # noqa: SIM115
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held_locks.append(handle)
            return index
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no free GPU among {count} ({per_gpu} job(s) each) after {timeout:.0f} s "
                f"({directory})"
            )
        time.sleep(poll)


def release_gpus() -> None:
    """Release the GPUs this process claimed (also happens when it exits)."""
    while _held_locks:
        _held_locks.pop().close()


def select_device(log_to: logging.Logger | None = None) -> torch.device:
    """CUDA (a claimed free GPU, or the scheduler's) when present, else the CPU; logs which."""
    logger = log_to or log
    if not torch.cuda.is_available():
        logger.info("Device: CPU (no CUDA device)")
        return torch.device("cpu")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        index = 0
        logger.info(
            "CUDA_VISIBLE_DEVICES=%s set by the scheduler", os.environ["CUDA_VISIBLE_DEVICES"]
        )
    else:
        index = claim_gpu(torch.cuda.device_count())
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    logger.info("Device: %s (cuda:%d)", torch.cuda.get_device_name(device), index)
    return device


def device_record(device: torch.device) -> dict[str, object]:
    """What a job ran on, for its ``device.json`` (the report reads these, not the logs)."""
    record: dict[str, object] = {
        "type": device.type,
        "name": "CPU",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        record.update(
            name=torch.cuda.get_device_name(device),
            index=device.index or 0,
            cuda=torch.version.cuda,
            visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES") or None,
        )
    return record
