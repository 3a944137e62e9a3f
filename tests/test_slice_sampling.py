"""segmentation.train_slices area_weighted: Buda et al.'s tumor-area-weighted slice sampling,
its epoch length, its seeding, and a resumed job that draws what the uninterrupted one drew."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from brainmri.training.batches import (
    area_weighted_indices,
    area_weights,
    segmentation_training_indices,
)
from brainmri.training.loop import FitSettings, configure_torch, epoch_generator, fit
from brainmri.training.setup import build_training_setup

CPU = torch.device("cpu")
# Three patients: one with tumor on 3 of 8 slices, one without tumor, one with equal areas.
AREAS = np.array([0, 0, 100, 300, 0, 0, 600, 0] + [0] * 6 + [50, 50])
PATIENTS = np.array(["a"] * 8 + ["b"] * 6 + ["c"] * 2)


def expected_shares() -> np.ndarray:
    """Each slice's probability: 1/3 for its patient, times its weight inside the patient."""
    shares = np.empty(len(AREAS))
    for members in pd.Series(np.arange(len(AREAS))).groupby(PATIENTS).groups.values():
        shares[members] = area_weights(AREAS[members]) / 3
    return shares


def test_weights_are_the_tumor_area_plus_a_tenth_spread_uniformly():
    weights = area_weights(AREAS[:8])
    assert weights.sum() == pytest.approx(1.0)
    # A slice without tumor in a tumor patient: 0.1 / (1.1 n); the others add area / (1.1 total).
    assert weights[0] == pytest.approx(0.1 / (1.1 * 8))
    assert weights[6] == pytest.approx((600 + 0.1 * 1000 / 8) / (1.1 * 1000))
    np.testing.assert_allclose(area_weights(np.zeros(6)), np.full(6, 1 / 6))  # no tumor: uniform


def test_draws_follow_the_weights():
    draws = 120_000
    drawn = area_weighted_indices(AREAS, PATIENTS, draws, torch.Generator().manual_seed(3))
    assert drawn.shape == (draws,) and drawn.dtype == np.int64
    observed = np.bincount(drawn, minlength=len(AREAS)) / draws
    expected = expected_shares()
    # Six binomial standard deviations: far beyond chance, far below the differences tested
    # (a zero-area slice of patient a: 0.0038; of patient b: 0.056).
    bound = 6 * np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(observed - expected) <= bound), (observed, expected)
    patient_share = pd.Series(observed).groupby(PATIENTS).sum()
    np.testing.assert_allclose(patient_share.to_numpy(), [1 / 3] * 3, atol=0.01)


def test_an_epoch_is_as_long_as_tumor_plus_empty_and_fixed_by_seed_and_epoch():
    has_tumor = AREAS > 0
    n_tumor = int(has_tumor.sum())  # 5 tumor slices, 11 empty: 5 + round(0.5 x 5) = 7

    def epoch(seed, number, fraction=0.5, areas=AREAS):
        generator = epoch_generator(seed, number)
        return segmentation_training_indices(
            areas > 0, "area_weighted", fraction, generator, areas, PATIENTS
        )

    assert len(epoch(1, 0)) == n_tumor + round(0.5 * n_tumor)
    plain = segmentation_training_indices(has_tumor, "tumor_plus_empty", 0.5, epoch_generator(1, 0))
    assert len(epoch(1, 0)) == len(plain)
    assert len(epoch(1, 0, fraction=0.0)) == n_tumor
    np.testing.assert_array_equal(epoch(1, 0), epoch(1, 0))  # same seed, same epoch
    assert not np.array_equal(epoch(1, 0), epoch(1, 1))
    assert not np.array_equal(epoch(1, 0), epoch(2, 0))
    # No tumor in the training slices: one draw per slice, uniform within each patient.
    assert len(epoch(1, 0, areas=np.zeros(len(AREAS), dtype=int))) == len(AREAS)
    with pytest.raises(ValueError, match="area_weighted: needs areas and patients"):
        segmentation_training_indices(has_tumor, "area_weighted", 0.5, epoch_generator(1, 0))


# --- through the training setup and a resumed fit ------------------------------------------

SETTINGS = {
    "name": "unet", "arch": "Unet", "encoder": "resnet18", "encoder_depth": 3,
    "pretrained": False, "input_size": 32, "epochs": 3, "batch_size": 4, "lr": 1e-3,
    "dice_smooth": 1.0, "train_slices": "area_weighted", "empty_fraction": 0.5,
    "augment": {"hflip": True},
}  # fmt: skip


def tiny_data():
    """Images and masks of the patients above (32 px); the mask of a slice covers its area."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 120, (len(AREAS), 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((len(AREAS), 32, 32), np.uint8)
    for i, area in enumerate(AREAS):
        masks[i].flat[:area] = 1
    images[masks.astype(bool)] = 230
    rows = pd.DataFrame(
        {"patient": PATIENTS, "has_tumor": (AREAS > 0).astype(int), "id": range(len(AREAS))}
    )
    return (lambda rows, kind: (images if kind == "images" else masks)[rows.index]), rows


def setup_and_fit(tmp_path, stop_at_epoch: int | None = None):
    load, rows = tiny_data()
    torch.manual_seed(0)
    configure_torch(CPU, 1)
    setup = build_training_setup("segmentation", SETTINGS, load, rows, rows.iloc[:4], CPU, 5)

    def train_batches(epoch):
        if epoch == stop_at_epoch:
            raise KeyboardInterrupt  # a job killed after the previous epoch was saved
        return setup.train_batches(epoch)

    settings = FitSettings.from_settings(SETTINGS, 5, setup.metric_name)
    result = fit(
        setup.model, setup.loss_fn, setup.metric_fn, train_batches, setup.val_batches,
        settings, CPU, tmp_path / "resume", "digest", setup.plan,
    )  # fmt: skip
    return setup, result


def test_the_setup_samples_by_the_mask_areas_and_a_resumed_fit_ends_the_same(tmp_path):
    setup, result = setup_and_fit(tmp_path / "straight")
    np.testing.assert_array_equal(setup.tumor_area, AREAS)  # counted in the masks
    assert list(setup.patients) == list(PATIENTS)
    order, _ = setup.epoch_indices(2)
    expected = area_weighted_indices(AREAS, PATIENTS, 7, epoch_generator(5, 2))
    np.testing.assert_array_equal(order, expected)

    with pytest.raises(KeyboardInterrupt):
        setup_and_fit(tmp_path / "resumed", stop_at_epoch=2)
    resumed_setup, resumed = setup_and_fit(tmp_path / "resumed")
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert [row["train_loss"] for row in resumed.history] == [
        row["train_loss"] for row in result.history
    ]
    state, again = setup.model.state_dict(), resumed_setup.model.state_dict()
    assert all(torch.equal(state[key], again[key]) for key in state)
