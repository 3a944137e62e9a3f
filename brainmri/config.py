"""Config helpers: per-model training settings and pre-flight checks beyond the JSON schema."""

from __future__ import annotations

import copy
from typing import Any

from brainmri.errors import ConfigError

STAGE_KEYS = {
    "classification": (
        "pretrained",
        "image_size",
        "epochs",
        "batch_size",
        "lr",
        "lr_schedule",
        "weight_decay",
        "patience",
        "augment",
    ),
    "segmentation": (
        "image_size",
        "epochs",
        "batch_size",
        "lr",
        "lr_schedule",
        "weight_decay",
        "patience",
        "augment",
        "dice_smooth",
        "train_slices",
        "empty_fraction",
        "threshold",
    ),
}


def _entries(config: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """The stage's model list as dicts with a ``name`` (backbones may be plain strings)."""
    key = "backbones" if stage == "classification" else "architectures"
    return [{"name": e} if isinstance(e, str) else dict(e) for e in config[stage][key]]


def model_names(config: dict[str, Any], stage: str) -> list[str]:
    """Names of the configured backbones (classification) or architectures (segmentation)."""
    names = [entry["name"] for entry in _entries(config, stage)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        key = "backbones" if stage == "classification" else "architectures"
        raise ConfigError(f"{stage}.{key}: duplicate names {duplicates}")
    return names


def training_settings(config: dict[str, Any], stage: str, name: str) -> dict[str, Any]:
    """The effective settings of one model: the stage's defaults, then the model's overrides.

    Classification: ``name`` is a backbone (a timm model name); ``settings["backbone"]`` too.
    Segmentation: ``name`` is an architecture entry's name; its ``arch`` and ``encoder`` are
    included, ``pretrained`` defaults to false.
    """
    section = config[stage]
    settings = {key: copy.deepcopy(section[key]) for key in STAGE_KEYS[stage] if key in section}
    matches = [entry for entry in _entries(config, stage) if entry["name"] == name]
    if not matches:
        raise ConfigError(f"{stage}: no model named {name!r}")
    if stage == "classification":
        settings["backbone"] = name
    else:
        settings["pretrained"] = False
    settings.update(copy.deepcopy(matches[0]))
    return settings


def preflight(config: dict[str, Any]) -> None:
    """Cross-key checks that the schema cannot express; raise ConfigError naming the key."""
    from brainmri.models import check_classifier_config, check_segmenter_config

    cascade_arch = config["cascade"]["architecture"]
    architectures = model_names(config, "segmentation")
    if cascade_arch not in architectures:
        raise ConfigError(
            f"cascade.architecture: {cascade_arch!r} is not the name of one of "
            f"segmentation.architectures ({', '.join(architectures)})"
        )
    for name in model_names(config, "classification"):
        check_classifier_config(
            training_settings(config, "classification", name),
            key=f"classification.backbones.{name}",
        )
    for name in architectures:
        check_segmenter_config(
            training_settings(config, "segmentation", name),
            key=f"segmentation.architectures.{name}",
        )
    data = config["data"]
    if data["source"] == "local" and not data["local_dir"]:
        raise ConfigError("data.local_dir: required when data.source is 'local'")
    if data["source"] == "synthetic":
        patients = data["synthetic"]["patients"]
        folds = config["split"]["folds"]
        if config["split"]["level"] == "patient":
            train_patients = patients - max(1, round(patients * config["split"]["test_fraction"]))
            if folds > train_patients:
                raise ConfigError(
                    f"split.folds: {folds} folds need at least {folds} training patients, "
                    f"but data.synthetic.patients={patients} leaves {train_patients}"
                )
