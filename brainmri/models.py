"""Model factories: timm classifiers and segmentation-models-pytorch segmenters."""

from __future__ import annotations

from typing import Any


def check_classifier_config(settings: dict[str, Any], key: str) -> None:
    """Raise ConfigError (naming ``key``) if timm cannot build this backbone at this size."""
    import timm

    from brainmri.config import ConfigError

    name = settings["backbone"]
    if not timm.is_model(name):
        raise ConfigError(f"{key}: timm has no model named {name!r}")


def check_segmenter_config(settings: dict[str, Any], key: str) -> None:
    """Raise ConfigError (naming ``key``) if smp cannot build this architecture/encoder/size."""
    import segmentation_models_pytorch as smp

    from brainmri.config import ConfigError

    if settings["encoder"] not in smp.encoders.get_encoder_names():
        raise ConfigError(
            f"{key}.encoder: segmentation-models-pytorch has no encoder {settings['encoder']!r}"
        )
    if settings["image_size"] % 32:
        raise ConfigError(f"{key}: image_size {settings['image_size']} must be a multiple of 32")
