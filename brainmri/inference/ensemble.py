"""The run's ensemble for prediction, loaded once per command: the classifiers and the
segmentation fold models (with flip TTA when asked) stay on the device for every image or
patient, and decide with :func:`brainmri.evaluation.decision.ensemble_decision`, the function
the evaluation decides with.

Segmentation follows the fold ensemble of evaluation: each fold model's probabilities are
quantized to the stored uint8 form, then averaged (:func:`mean_probabilities`), thresholded
(:func:`binarize`) and cleaned per volume by the caller; the voter counts the cleaned pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from brainmri.errors import InputError
from brainmri.evaluation.decision import Decision, EnsembleRule, ensemble_decision
from brainmri.evaluation.masks import mean_probabilities
from brainmri.inference.segment import (
    inference_batches,
    load_for_inference,
    load_segmenter,
    place,
    stored_probabilities,
)
from brainmri.training.evaluate import predict_logits


def model_name(path: Path, checkpoint: dict[str, Any]) -> str:
    """A classifier's name: its settings' name (the configured backbone), else its folder."""
    settings = checkpoint.get("settings") or {}
    return str(settings.get("name") or settings.get("backbone") or path.parent.name)


class EnsembleModels:
    """The trained classifier ensemble and segmentation fold ensemble, loaded once."""

    def __init__(
        self,
        classifiers: list[Path],
        segmenters: list[Path],
        rule: EnsembleRule,
        device: torch.device,
        tta: bool = False,
    ) -> None:
        if not classifiers or not segmenters:
            raise InputError("prediction needs at least one classifier and one segmenter")
        self.rule, self.device, self.tta = rule, device, tta
        self.classifiers = [load_for_inference(path, device) for path in classifiers]
        self.names = [
            model_name(path, checkpoint)
            for path, (_, checkpoint) in zip(classifiers, self.classifiers, strict=True)
        ]
        self.segmenters = [load_segmenter(path, device, tta) for path in segmenters]

    @property
    def voters(self) -> list[str]:
        """The names of the voters of every decision."""
        return self.rule.voters(self.names)

    def place(self, images: np.ndarray) -> tuple[Any, Any]:
        """The images on the device once, for :meth:`segment` and :meth:`decide`."""
        return place(images, self.device)

    def probabilities(self, images: np.ndarray, placed: tuple[Any, Any] | None = None):
        """Each classifier's tumor probability of each image: (models, images)."""
        placed = self.place(images) if placed is None else placed
        probs = []
        for model, checkpoint in self.classifiers:
            batches = inference_batches(placed, checkpoint, self.device)
            logits = predict_logits(model, batches.epoch(), self.device)
            probs.append(torch.softmax(logits, 1)[:, 1].numpy())
        return np.stack(probs)

    def segment_folds(
        self,
        images: np.ndarray,
        rows: pd.DataFrame | None,
        placed: tuple[Any, Any] | None = None,
    ) -> list[np.ndarray]:
        """Each fold model's stored (uint8) tumor probability (N, S, S). ``rows`` (patient,
        slice_index) feed 2.5D models their neighbours; None (independent images) refuses
        them."""
        placed = self.place(images) if placed is None else placed
        return [
            stored_probabilities([model], images, self.device, self.tta, rows, placed)[0]
            .cpu()
            .numpy()
            for model in self.segmenters
        ]

    def segment(
        self,
        images: np.ndarray,
        rows: pd.DataFrame | None,
        placed: tuple[Any, Any] | None = None,
    ) -> np.ndarray:
        """The fold ensemble's stored (uint8) tumor probability (N, S, S): each fold model's
        probabilities quantized, then averaged, as the fold ensemble averages the stored test
        probabilities (:meth:`segment_folds`, whose spread is the volumes' uncertainty)."""
        return mean_probabilities(self.segment_folds(images, rows, placed))

    def decide(
        self,
        images: np.ndarray,
        areas: np.ndarray,
        order: tuple[np.ndarray, np.ndarray] | None,
        placed: tuple[Any, Any] | None = None,
    ) -> Decision:
        """The ensemble's decision per image; ``areas``: the cleaned segmentation mask's pixels
        (the voter's input); ``order`` (patient, slice number) for smoothing, or None."""
        probabilities = self.probabilities(images, placed)
        return ensemble_decision(self.rule, probabilities, areas, order)
