"""Device choice and GPU placement on multi-GPU workstations.

Snakemake gives a job no GPU index, so with ``--resources gpu=N`` every job would land on GPU 0.
A job claims a free GPU by taking an exclusive ``flock`` on a lock file per GPU and holds it for
its lifetime; the kernel releases the lock when the process ends, however it ends. Where
``CUDA_VISIBLE_DEVICES`` names one device (SLURM gives each job its own), every job uses it; where
it names several (``CUDA_VISIBLE_DEVICES=0,1``, ``salloc -G4``), the jobs spread over those.

Several jobs per GPU: with ``BRAINMRI_JOBS_PER_GPU=K`` (the workflow sets it from the config key
``gpu_jobs_per_device``) each GPU has K slots, ``gpu<key>.lock`` and ``gpu<key>.slot<k>.lock``
for k = 1..K-1, and ``--resources gpu=N`` counts slots (N = GPUs x K). Jobs take the first free
slot in the order slot 0 of every GPU, then slot 1 of every GPU, ..., so they spread over the
GPUs before they share one. A GPU's key is its UUID where CUDA reports one (the same physical
card under any ``CUDA_VISIBLE_DEVICES``), else its ``CUDA_VISIBLE_DEVICES`` entry, else its index.

The lock folder is per user: ``$BRAINMRI_GPU_LOCK_DIR``, default
``/tmp/brainmri-gpu-locks-<uid>`` (mode 0700; not under ``$TMPDIR``, which differs between
shells and jobs of the same user). Jobs of one user coordinate through it; users sharing a GPU do
not (size their jobs with ``gpu_jobs_per_device`` and the memory settings instead).

The device (``BRAINMRI_DEVICE``, the config key ``device``): ``auto`` uses CUDA when it works and
the CPU on a machine without an NVIDIA driver; ``cuda`` insists on CUDA; ``cpu`` never uses it.
Where an NVIDIA driver is installed (``/proc/driver/nvidia/version``) or
``CUDA_VISIBLE_DEVICES`` names devices but CUDA does not work (a driver older than the CUDA the
torch wheels are built for), a job stops with one line naming the driver found and the ways out
instead of training on the CPU without saying so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch

from brainmri.errors import InputError

log = logging.getLogger(__name__)

_held_locks: list[IO] = []

LOCK_ROOT = Path("/tmp")  # not tempfile.gettempdir(): $TMPDIR would split the coordination
LOCK_HINT = "set BRAINMRI_GPU_LOCK_DIR to a folder of your own"
NVIDIA_VERSION_FILE = Path("/proc/driver/nvidia/version")
# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA compatibility table,
# "minor version compatibility").
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
DEVICE_CHOICES = ("auto", "cuda", "cpu")


class DeviceError(InputError):
    """The device cannot be used as configured (one line: what was found, the ways out)."""


def lock_dir() -> Path:
    """``$BRAINMRI_GPU_LOCK_DIR``, else ``/tmp/brainmri-gpu-locks-<uid>`` (per user)."""
    custom = os.environ.get("BRAINMRI_GPU_LOCK_DIR")
    return Path(custom) if custom else LOCK_ROOT / f"brainmri-gpu-locks-{os.getuid()}"


def prepare_lock_dir(directory: Path) -> None:
    """Create the lock folder (mode 0700); the default one must be this user's own folder."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as error:
        raise DeviceError(
            f"{directory}: cannot create the GPU lock folder ({error.strerror}); {LOCK_HINT}"
        ) from None
    if os.environ.get("BRAINMRI_GPU_LOCK_DIR"):
        return  # the user's choice (possibly a folder shared on purpose)
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise DeviceError(
            f"{directory}: the GPU lock folder is not a folder of this user (uid {os.getuid()}; "
            f"owner uid {info.st_uid}); remove it or {LOCK_HINT}"
        )


def open_lock(path: Path) -> IO:
    """``path`` opened read-write for ``flock`` (created 0600; a symlink is refused)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.fdopen(os.open(path, flags, 0o600), "r+")
    except OSError as error:
        raise DeviceError(
            f"{path}: cannot open the GPU lock file ({error.strerror}); {LOCK_HINT}"
        ) from None


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


def visible_devices() -> list[str] | None:
    """The entries of ``$CUDA_VISIBLE_DEVICES`` (None when unset; [] when it hides all)."""
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    # CUDA reads indices and GPU-/MIG- UUIDs up to the first other entry: "", "-1" or an old
    # SLURM's "NoDevFiles" hide every device.
    visible = []
    for entry in (part.strip() for part in text.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        visible.append(entry)
    return visible


def lock_keys(count: int) -> list[str]:
    """A lock name per visible GPU: its UUID, else its CUDA_VISIBLE_DEVICES entry, else its
    index (so two workflows with different CUDA_VISIBLE_DEVICES lock the same card alike)."""
    visible = visible_devices() or []
    keys = []
    for index in range(count):
        try:
            key = f"-{torch.cuda.get_device_properties(index).uuid}"
        except Exception:  # no CUDA (fake device counts) or an older torch
            key = visible[index] if index < len(visible) else str(index)
        keys.append(re.sub(r"[^A-Za-z0-9_.-]", "_", key))
    return keys


def claim_gpu(
    count: int,
    directory: Path | None = None,
    timeout: float = 3600.0,
    poll: float = 2.0,
    per_gpu: int | None = None,
    keys: Sequence[str] | None = None,
) -> int:
    """Index of a GPU with a job slot no other job of this user holds; wait while all
    ``count x per_gpu`` slots (default per_gpu: :func:`jobs_per_gpu`) are taken. ``keys``
    name the GPUs' lock files (default: their indices)."""
    directory = directory or lock_dir()
    prepare_lock_dir(directory)
    per_gpu = per_gpu or jobs_per_gpu()
    keys = list(keys) if keys is not None else [str(index) for index in range(count)]
    deadline = time.monotonic() + timeout
    while True:
        for index, slot in slot_order(count, per_gpu):
            name = f"gpu{keys[index]}.lock" if slot == 0 else f"gpu{keys[index]}.slot{slot}.lock"
            handle = open_lock(directory / name)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            except OSError as error:  # e.g. ENOLCK: a network filesystem without flock
                handle.close()
                raise DeviceError(
                    f"{directory / name}: cannot lock the GPU lock file ({error.strerror}); "
                    f"{LOCK_HINT} on a local disk"
                ) from None
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


def requested_device() -> str:
    """``$BRAINMRI_DEVICE`` (the config key ``device``): auto (default), cuda or cpu."""
    value = os.environ.get("BRAINMRI_DEVICE", "auto").strip().lower() or "auto"
    if value not in DEVICE_CHOICES:
        raise ValueError(f"BRAINMRI_DEVICE={value!r}: must be one of {', '.join(DEVICE_CHOICES)}")
    return value


def nvidia_driver_version(version_file: Path | None = None) -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``), None without one."""
    path = version_file or NVIDIA_VERSION_FILE
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else "unknown"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def cuda_problem(wanted: str, version_file: Path | None = None) -> str | None:
    """Why a job that expects a GPU cannot have one, else None. A GPU is expected with
    ``device: cuda``, and with ``auto`` where a CUDA build of torch meets an NVIDIA driver (a
    CUDA_VISIBLE_DEVICES without a driver, as a scheduler's GRES on a CPU node sets it, is not
    enough). ``auto`` on a machine without an NVIDIA driver, with
    a CPU-only torch build or a CUDA_VISIBLE_DEVICES that hides every device runs on the CPU."""
    visible = visible_devices()
    path = version_file or NVIDIA_VERSION_FILE
    driver = nvidia_driver_version(path)
    built = torch.version.cuda
    expected = wanted == "cuda" or (built is not None and visible != [] and driver is not None)
    if not expected:
        return None
    cpu = "or set `device: cpu` in the config (BRAINMRI_DEVICE=cpu) to run on the CPU"
    if built is None:
        return (
            f"device: cuda, but torch {torch.__version__} is a CPU-only build: install a CUDA "
            f"build of torch, {cpu}"
        )
    if visible == []:
        shown = os.environ["CUDA_VISIBLE_DEVICES"]
        return f"device: cuda, but CUDA_VISIBLE_DEVICES={shown!r} hides every GPU: unset it, {cpu}"
    needed = MIN_DRIVER.get(_version_tuple(built)[0], "?")
    found = f"NVIDIA driver {driver} ({path})" if driver else f"no NVIDIA driver ({path} missing)"
    if (
        driver
        and "?" not in (needed, driver)
        and driver != "unknown"
        and (_version_tuple(driver) >= _version_tuple(needed))
    ):
        way = (
            "the driver is recent enough, so make the GPUs visible to this process "
            "(/dev/nvidia*, a container's --gpus),"
        )
    else:
        way = (
            f"install an NVIDIA driver >= {needed}, or a torch build for the CUDA version your "
            "driver supports (docs/running.md),"
        )
    return (
        f"CUDA is unusable: torch {torch.__version__} is built for CUDA {built}, which needs an "
        f"NVIDIA driver >= {needed}; found {found}; {way} {cpu}"
    )


def select_device(
    log_to: logging.Logger | None = None, version_file: Path | None = None
) -> torch.device:
    """CUDA (a claimed free GPU among the visible ones) when present, else the CPU; logs which.
    :class:`DeviceError` where a GPU is expected but CUDA is unusable (:func:`cuda_problem`)."""
    logger = log_to or log
    wanted = requested_device()
    if wanted == "cpu":
        logger.info("Device: CPU (device: cpu)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        problem = cuda_problem(wanted, version_file)
        if problem:
            raise DeviceError(problem)
        logger.info("Device: CPU (no CUDA device)")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and count == 1:
        index = 0  # the scheduler's one device (SLURM): every job of this workflow shares it
        logger.info("CUDA_VISIBLE_DEVICES=%s: one visible device", visible)
    else:
        index = claim_gpu(count, keys=lock_keys(count))
        if visible is not None:
            logger.info("CUDA_VISIBLE_DEVICES=%s: %d visible devices", visible, count)
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
