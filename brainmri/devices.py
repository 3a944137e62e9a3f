"""Device choice and GPU placement on multi-GPU workstations.

Snakemake gives a job no GPU index, so with ``--resources gpu=N`` every job would land on GPU 0.
Unless a scheduler already set ``CUDA_VISIBLE_DEVICES`` (SLURM does), a job claims a free GPU by
taking an exclusive ``flock`` on ``<lock dir>/gpu<index>.lock`` and holds it for its lifetime;
the kernel releases the lock when the process ends, however it ends.
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


def claim_gpu(
    count: int, directory: Path | None = None, timeout: float = 3600.0, poll: float = 2.0
) -> int:
    """Index of a GPU no other job of this workflow holds; wait while all are taken."""
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        for index in range(count):
            handle = open(directory / f"gpu{index}.lock", "a+")  # noqa: SIM115
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
            raise TimeoutError(f"no free GPU among {count} after {timeout:.0f} s ({directory})")
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
