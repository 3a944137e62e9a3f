"""Fetch ImageNet weights of a timm backbone or an smp encoder into the local cache (safetensors).

Runs where the network is (a Snakemake localrule); training jobs only read the cache. Offline,
convert a weights file you have (safetensors, or a .pth state dict loadable with
weights_only=True) with --from-file.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from brainmri.errors import InputError
from brainmri.io import atomic_path, run_cli, setup_logging
from brainmri.models import safe_torch_load, weights_hint

# Seconds to wait for the hub to answer a connection before calling the network unreachable.
PROBE_TIMEOUT_S = 5.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub (timm's and smp's weights) cannot be reached, or None.

    One DNS lookup and one TCP connection with a short timeout, so that an offline machine fails
    in seconds rather than after the hub client's retries. Skipped in the hub's offline mode
    (HF_HUB_OFFLINE=1), where the client reads only its local cache.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return None
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as error:
        return f"{host}:{port} unreachable ({type(error).__name__}: {error})"


def fetch(library: str, name: str, output: Path) -> dict[str, torch.Tensor]:
    """The pretrained state dict from timm's / smp's hub (needs the network)."""
    problem = hub_unreachable()
    if problem:
        raise InputError(f"no network: {problem}; " + weights_hint(library, name, output))
    try:
        if library == "timm":
            import timm

            model = timm.create_model(name, pretrained=True, num_classes=0)
        else:
            import segmentation_models_pytorch as smp

            model = smp.encoders.get_encoder(name, weights="imagenet")
    except Exception as error:  # hub, network and model-name errors alike
        raise InputError(
            f"could not download the weights ({type(error).__name__}: {str(error)[:200]}); "
            + weights_hint(library, name, output)
        ) from None
    return model.state_dict()


def from_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local safetensors or .pth file (never unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = safe_torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", choices=["timm", "smp"], required=True)
    parser.add_argument("--name", required=True, help="timm model or smp encoder name")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--from-file", type=Path, help="convert this local weights file instead")
    args = parser.parse_args()
    log = setup_logging()
    if args.from_file:
        state = from_file(args.from_file)
    else:
        state = fetch(args.library, args.name, args.output)
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(args.output) as tmp:
        save_file(tensors, str(tmp))
    log.info("Cached %d tensors of %s %s in %s", len(tensors), args.library, args.name, args.output)


if __name__ == "__main__":
    run_cli(main)
