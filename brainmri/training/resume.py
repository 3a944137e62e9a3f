"""Resume state of a training job: the global RNG states (the CUDA one of the job's own
device only, so a job resumes with fewer visible GPUs), the settings digest that keys a state,
and the state files (written atomically, the previous one kept)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainmri.errors import InputError
from brainmri.io import atomic_path
from brainmri.models import safe_torch_load

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states(device: torch.device) -> dict[str, Any]:
    """The global RNG states (python, numpy, torch; CUDA: that of the job's device only, so a
    job resumes with fewer visible GPUs) as plain types and tensors."""
    numpy_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_states` saved; its CUDA state goes to ``device`` (not on the
    CPU). An older state with one entry per visible GPU gives that of ``device``'s index (or
    the first, where fewer GPUs were visible), never an IndexError."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    cuda_state = states.get("cuda")
    if isinstance(cuda_state, list | tuple):  # the older format
        index = device.index or 0
        cuda_state = cuda_state[index if index < len(cuda_state) else 0] if cuda_state else None
    if device.type == "cuda" and cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def load_resume_state(resume_dir: Path, digest: str) -> dict[str, Any] | None:
    for name in ("state.pt", "state.prev.pt"):
        path = resume_dir / name
        if not path.is_file():
            continue
        try:
            state = safe_torch_load(path)
        except InputError as error:
            log.warning("Ignoring the resume state %s: %s", path, error)
            continue
        if state.get("digest") != digest:
            log.warning("Ignoring the resume state %s: it was made with other settings", path)
            continue
        return state
    return None


def save_resume_state(resume_dir: Path, state: dict[str, Any]) -> None:
    resume_dir.mkdir(parents=True, exist_ok=True)
    current = resume_dir / "state.pt"
    with atomic_path(resume_dir / "state.next.pt") as tmp:
        torch.save(state, tmp)
    if current.is_file():
        os.replace(current, resume_dir / "state.prev.pt")
    os.replace(resume_dir / "state.next.pt", current)


def finish_resume(resume_dir: Path) -> None:
    """Remove the resume state once the final outputs exist."""
    shutil.rmtree(resume_dir, ignore_errors=True)
