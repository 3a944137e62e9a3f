"""Model factories (timm classifiers, segmentation-models-pytorch segmenters), the local weight
cache, and safe checkpoints.

Every model takes a float batch in [0, 1] of shape (B, 3, S, S) and applies its own input
normalisation (a :class:`Normalized` wrapper), so training, evaluation and ``predict`` share
exactly one preprocessing. Checkpoints hold plain types and tensors only and are always read
with ``torch.load(weights_only=True)``; weight files are safetensors.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainmri.errors import InputError, did_you_mean
from brainmri.io import atomic_path

CHECKPOINT_FORMAT = "brainmri-checkpoint-v2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """Wrap a network so that it takes [0, 1] inputs and normalises them itself."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        view = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class ClassifierHead(nn.Sequential):
    """The small custom head on the pooled backbone features: 2 logits (no tumor, tumor)."""

    def __init__(self, features: int, hidden: int = 256, dropout: float = 0.3) -> None:
        super().__init__(
            nn.Linear(features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 2),
        )


class WeightsError(InputError):
    """Pretrained weights missing from the local cache, or unreadable."""


def weights_hint(library: str, name: str, path: str | os.PathLike[str]) -> str:
    return (
        f"pretrained ImageNet weights for {library} model {name!r} are not in the local cache "
        f"({path}). Fetch them where the network is: `snakemake {path}` (the download_weights "
        f"rule), or `python workflow_scripts/download_weights.py --library {library} --name "
        f"{name} --output {path}`; offline, convert a weights file you have with "
        f"`... --from-file your_file.safetensors|.pth`. Or set pretrained: false."
    )


def load_weights_file(path: str | os.PathLike[str], library: str, name: str) -> dict:
    """A cached state dict (safetensors; never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path or not Path(path).is_file():
        raise WeightsError(weights_hint(library, name, path or "<none>"))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: unreadable weights file ({error})") from None


def _timm_backbone(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0)


def build_classifier(settings: dict[str, Any], weights: str | None = None) -> Normalized:
    """A timm backbone (pooled features) + :class:`ClassifierHead`, wrapped in Normalized."""
    name = settings["backbone"]
    backbone = _timm_backbone(name)
    if settings.get("pretrained"):
        state = load_weights_file(weights, "timm", name)
        own = backbone.state_dict()
        state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        missing = sorted(set(own) - set(state))
        if missing:
            raise WeightsError(
                f"{weights}: does not match timm model {name!r} (missing {missing[:3]}...)"
            )
        backbone.load_state_dict(state)
    cfg = backbone.pretrained_cfg or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    # Pooled-feature width (timm models with a conv head expose it as head_hidden_size).
    features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return Normalized(nn.Sequential(backbone, ClassifierHead(features)), mean, std)


# smp architectures whose output size follows encoder_depth (a fixed final upsampling).
DEPTH_CHANGES_OUTPUT_SIZE = ("FPN", "PSPNet")


def depth_options(settings: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """smp keyword arguments of an architecture entry's ``encoder_depth``: none where it is
    absent (smp's default depth), else ``encoder_depth`` and, for a decoder with one width per
    stage (Unet, UnetPlusPlus, MAnet), the first ``encoder_depth`` of smp's default
    ``decoder_channels`` (256, 128, 64, 32, 16). ConfigError naming
    ``key`` (default ``segmentation.architectures.<name>``) for a depth out of 3..5 or an
    architecture whose output size would change."""
    import inspect

    import segmentation_models_pytorch as smp

    from brainmri.errors import ConfigError

    depth = settings.get("encoder_depth")
    if depth is None:
        return {}
    key = f"{key or 'segmentation.architectures.' + str(settings.get('name', '?'))}.encoder_depth"
    if isinstance(depth, bool) or not isinstance(depth, int) or not 3 <= depth <= 5:
        raise ConfigError(f"{key}: {depth!r} must be an integer from 3 to 5")
    arch = settings["arch"]
    if arch in DEPTH_CHANGES_OUTPUT_SIZE:
        raise ConfigError(
            f"{key}: {arch} does not support it (its output size would follow the depth)"
        )
    options: dict[str, Any] = {"encoder_depth": depth}
    model_class = smp.MODEL_ARCHITECTURES_MAPPING.get(arch.lower())  # None: smp refuses arch
    parameters = inspect.signature(model_class).parameters if model_class else {}
    parameter = parameters.get("decoder_channels")
    if parameter is not None and isinstance(parameter.default, tuple | list):
        options["decoder_channels"] = tuple(parameter.default)[:depth]
    return options


def build_segmenter(settings: dict[str, Any], weights: str | None = None) -> Normalized:
    """An smp model (1 output channel, logits), encoder from the weight cache if pretrained;
    ``encoder_depth`` (optional) as :func:`depth_options` says."""
    import segmentation_models_pytorch as smp

    from brainmri.training.context import input_channels

    channels = input_channels(settings)  # 3, or 3 per slice of a 2.5D window
    net = smp.create_model(
        settings["arch"],
        encoder_name=settings["encoder"],
        encoder_weights=None,
        in_channels=channels,
        classes=1,
        **depth_options(settings),
    )
    if settings.get("pretrained"):
        state = load_weights_file(weights, "smp", settings["encoder"])
        result = net.encoder.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise WeightsError(
                f"{weights}: does not match encoder {settings['encoder']!r} "
                f"(missing {result.missing_keys[:3]}...)"
            )
    repeat = channels // 3
    return Normalized(net, IMAGENET_MEAN * repeat, IMAGENET_STD * repeat)


def build_model(task: str, settings: dict[str, Any], weights: str | None = None) -> Normalized:
    if task == "classification":
        return build_classifier(settings, weights)
    if task == "segmentation":
        return build_segmenter(settings, weights)
    raise ValueError(f"unknown task {task!r}")


@functools.lru_cache(maxsize=64)
def _classifier_accepts(name: str, size: int) -> str | None:
    """None if timm's ``name`` runs on a size x size input, else the error text."""
    try:
        with torch.device("meta"):
            model = _timm_backbone(name).eval()
            model(torch.zeros(1, 3, size, size))
    except NotImplementedError:  # an op without a meta kernel: try for real on the CPU
        model = _timm_backbone(name).eval()
        with torch.no_grad():
            try:
                model(torch.zeros(1, 3, size, size))
            except RuntimeError as error:
                return str(error).splitlines()[0]
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def check_classifier_config(settings: dict[str, Any], key: str) -> None:
    """Raise ConfigError (naming ``key``) if timm cannot build this backbone at this size."""
    import timm

    from brainmri.errors import ConfigError

    name = settings["backbone"]
    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise ConfigError(f"{key}: timm has no model named {name!r}{hint}")
    size = settings["input_size"]
    problem = _classifier_accepts(name, size)
    if problem:
        raise ConfigError(f"{key}: {name} cannot take {size} px images ({problem})")


@functools.lru_cache(maxsize=64)
def _segmenter_accepts(arch: str, encoder: str, size: int, depth: int | None = None) -> str | None:
    """None if smp's ``arch``/``encoder`` (``depth``: that encoder_depth) runs on a size x size
    input, else the error text."""
    import segmentation_models_pytorch as smp

    options = depth_options({"arch": arch, "encoder_depth": depth}, "x")
    try:
        with torch.device("meta"):
            model = smp.create_model(
                arch, encoder_name=encoder, encoder_weights=None, classes=1, **options
            )
            model.eval()(torch.zeros(1, 3, size, size))
    except NotImplementedError:  # an op without a meta kernel: assume it runs
        return None
    except (RuntimeError, ValueError, KeyError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def check_segmenter_config(settings: dict[str, Any], key: str) -> None:
    """Raise ConfigError (naming ``key``) if smp cannot build this architecture/encoder/size."""
    import segmentation_models_pytorch as smp

    from brainmri.errors import ConfigError

    arch = settings["arch"]
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        known = sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())
        raise ConfigError(
            f"{key}.arch: segmentation-models-pytorch has no architecture {arch!r}"
            f"{did_you_mean(arch, known) or ' (known: ' + ', '.join(known) + ')'}"
        )
    encoders = smp.encoders.get_encoder_names()
    if settings["encoder"] not in encoders:
        raise ConfigError(
            f"{key}.encoder: segmentation-models-pytorch has no encoder {settings['encoder']!r}"
            f"{did_you_mean(settings['encoder'], encoders)}"
        )
    size = settings["input_size"]
    if size % 32:
        raise ConfigError(
            f"{key}.input_size: {size} must be a multiple of 32 (the encoder's output stride)"
        )
    if settings.get("slice_context", 0) and settings.get("pretrained"):
        raise ConfigError(
            f"{key}: slice_context (2.5D input) needs pretrained: false (the ImageNet encoder "
            "weights take 3 input channels)"
        )
    depth_options(settings, key)  # a bad encoder_depth names {key}.encoder_depth
    problem = _segmenter_accepts(arch, settings["encoder"], size, settings.get("encoder_depth"))
    if problem:
        raise ConfigError(
            f"{key}: {arch}/{settings['encoder']} cannot take {size} px images ({problem})"
        )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    task: str,
    settings: dict[str, Any],
    **extra: Any,
) -> None:
    """Atomically write a checkpoint of plain types and tensors (see docs/design.md)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "task": task,
        "settings": settings,
        "state_dict": state,
        "input_size": int(settings["input_size"]),
        **extra,
    }
    if isinstance(model, Normalized):
        payload["normalization"] = {
            "mean": model.mean.flatten().tolist(),
            "std": model.std.flatten().tolist(),
        }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; refuse files that need arbitrary unpickling."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"{path}: refusing to load: the file needs arbitrary unpickling, which could run "
            f"code ({first[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable or truncated checkpoint ({error})") from None


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Normalized, dict[str, Any]]:
    """Rebuild the model of a checkpoint (safely loaded) in eval mode on ``device``."""
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        older = " (an older version of the workflow wrote it: train again)" if found else ""
        raise InputError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint{older}")
    settings = dict(checkpoint["settings"])
    settings["pretrained"] = False  # the weights come from the checkpoint
    model = build_model(checkpoint["task"], settings)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
