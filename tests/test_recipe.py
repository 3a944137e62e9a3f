"""The training and inference recipe (issue 17): losses, selection metric, lr schedule, TTA,
per-volume post-processing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainmri.evaluation.classification import vote
from brainmri.evaluation.postprocess import PostProcess, clean_patients, clean_volume
from brainmri.evaluation.sequences import by_sequences
from brainmri.evaluation.voting import (
    choose_min_pixels,
    mask_areas,
    smooth_decisions,
    voter_decisions,
    voter_table,
)
from brainmri.inference.tta import FLIPS, FlipTTA, with_tta
from brainmri.training.context import input_channels, stack_neighbours
from brainmri.training.evaluate import MetricSums, segmentation_metrics
from brainmri.training.loop import FitSettings, fit
from brainmri.training.losses import segmentation_loss, selection_column
from brainmri.training.modality import replace_sequences, with_modality_dropout
from brainmri.training.schedule import make_scheduler, selection_score, warmup_cosine_factor

# --- test-time augmentation -------------------------------------------------------------------


def test_tta_of_a_model_whose_output_is_its_input_is_exactly_the_input():
    images = torch.randint(0, 255, (3, 1, 8, 6)).float()
    out = FlipTTA(nn.Identity())(images)
    assert torch.equal(out, images)
    assert with_tta(nn.Identity(), False).__class__ is nn.Identity


def test_tta_undoes_each_flip_before_averaging():
    seen = []

    class Ramp(nn.Module):  # not flip-equivariant: adds the column index
        def forward(self, x):
            seen.append(x.clone())
            return x + torch.arange(x.shape[-1], dtype=x.dtype)

    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    out = FlipTTA(Ramp())(x)
    assert len(seen) == len(FLIPS) == 4
    assert torch.equal(seen[1], x.flip(3)) and torch.equal(seen[2], x.flip(2))
    assert torch.equal(seen[3], x.flip(2).flip(3))
    # Unflipped ramp 0..3 twice, flipped-back ramp 3..0 twice: every column gets +1.5.
    assert torch.equal(out, x + 1.5)


# --- post-processing on hand-made volumes -----------------------------------------------------


def _volume():
    volume = np.zeros((4, 10, 10), dtype=bool)
    volume[0:3, 1:3, 1:3] = True  # 12 voxels across three slices: one 3D component
    volume[3, 8, 8] = True  # 1 voxel
    volume[1, 6:8, 5] = True  # 2 voxels
    return volume


def test_small_3d_components_are_dropped_and_defaults_change_nothing():
    volume = _volume()
    assert np.array_equal(clean_volume(volume, PostProcess()), volume)
    kept = clean_volume(volume, PostProcess(min_component_voxels=2))
    assert kept.sum() == 14 and not kept[3, 8, 8]
    kept = clean_volume(volume, PostProcess(min_component_voxels=3))
    assert kept.sum() == 12 and kept[0:3, 1:3, 1:3].all()
    assert not clean_volume(volume, PostProcess(min_component_voxels=13)).any()


def test_keep_largest_and_6_connectivity():
    volume = _volume()
    largest = clean_volume(volume, PostProcess(keep_largest=True))
    assert largest.sum() == 12 and largest[0:3, 1:3, 1:3].all()
    diagonal = np.zeros((2, 3, 3), dtype=bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # touch only at a corner: two components
    assert clean_volume(diagonal, PostProcess(min_component_voxels=2)).sum() == 0
    stacked = np.zeros((2, 3, 3), dtype=bool)
    stacked[0, 1, 1] = stacked[1, 1, 1] = True  # same pixel on neighbouring slices: one
    assert clean_volume(stacked, PostProcess(min_component_voxels=2)).sum() == 2
    assert not clean_volume(np.zeros((2, 3, 3)), PostProcess(keep_largest=True)).any()


def test_patients_are_cleaned_in_slice_order_whatever_the_row_order():
    # Patient a: a blob on slices 0 and 1 that only connects in slice order; rows shuffled.
    masks = np.zeros((5, 4, 4), dtype=bool)
    rows = pd.DataFrame({"patient": ["a", "b", "a", "b", "a"], "slice_index": [1, 0, 2, 1, 0]})
    masks[0, 1, 1] = masks[4, 1, 1] = True  # a: slices 1 and 0, same pixel -> 2 voxels
    masks[2, 3, 3] = True  # a: slice 2, isolated -> 1 voxel
    masks[1, 0, 0] = True  # b: one voxel
    masks[3, 0, 0] = True  # b: slice 1, same pixel -> connects with b's slice 0
    out = clean_patients(masks, rows, PostProcess(min_component_voxels=2))
    expected = masks.copy()
    expected[2, 3, 3] = False
    assert np.array_equal(out, expected)
    with pytest.raises(ValueError, match="3 masks for 5 rows"):
        clean_patients(masks[:3], rows, PostProcess(min_component_voxels=2))


# --- losses, metrics, selection -----------------------------------------------------------------


def test_dice_bce_is_dice_plus_bce_and_unknown_losses_fail():
    logits = torch.randn(2, 1, 8, 8)
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    dice = segmentation_loss({"dice_smooth": 1.0})(logits, masks)
    both = segmentation_loss({"dice_smooth": 1.0, "loss": "dice_bce"})(logits, masks)
    assert float(both) == pytest.approx(
        float(dice + F.binary_cross_entropy_with_logits(logits, masks))
    )
    with pytest.raises(ValueError, match=r"segmentation\.loss"):
        segmentation_loss({"dice_smooth": 1.0, "loss": "focal"})
    assert selection_column({}) == "val_loss"
    assert selection_column({"select_on": "tumor_dice"}) == "val_dice_tumor_slices"


def test_tumor_slice_dice_skips_slices_without_tumor():
    masks = torch.zeros(3, 1, 4, 4)
    masks[0, 0, :2, :2] = 1  # tumor, predicted exactly
    masks[1, 0, 2:, 2:] = 1  # tumor, missed
    logits = torch.full((3, 1, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # slice 2: empty and predicted empty (Dice 1)
    values = segmentation_metrics(logits, masks)
    assert values["dice_all_slices"].tolist() == [1.0, 0.0, 1.0]
    sums = MetricSums("dice")
    sums.add(values)
    means = sums.means()
    assert means["dice_all_slices"] == pytest.approx(2 / 3)
    assert means["dice_tumor_slices"] == pytest.approx(0.5)
    row = {"val_loss": 0.2, "val_dice_tumor_slices": float("nan")}
    assert selection_score(row, "val_loss") == -0.2
    assert selection_score(row, "val_dice_tumor_slices") == float("-inf")
    with pytest.raises(ValueError, match="not logged"):
        selection_score(row, "val_volume_dice")


def test_checkpoint_follows_the_tumor_slice_dice_when_asked(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(8, 1, 8, 8)
    masks = (images > 0.6).float()
    masks[4:] = 0  # half the slices without tumor

    def batches(epoch=0):
        return iter([(images, masks)])

    for select_on in ("val_loss", "val_dice_tumor_slices"):
        model = nn.Conv2d(1, 1, 3, padding=1)
        settings = FitSettings(epochs=4, lr=0.05, seed=1, metric_name="dice", select_on=select_on)
        result = fit(
            model,
            segmentation_loss({"dice_smooth": 1.0, "loss": "dice_bce"}),
            segmentation_metrics,
            batches,
            batches,
            settings,
            torch.device("cpu"),
            tmp_path / select_on,
            "digest",
        )
        history = pd.DataFrame(result.history)
        assert "val_dice_tumor_slices" in history and "val_dice_all_slices" in history
        if select_on == "val_loss":
            assert result.best_epoch == int(history["val_loss"].idxmin())
        else:
            assert result.best_epoch == int(history["val_dice_tumor_slices"].idxmax())
        assert result.best_val_loss == pytest.approx(history["val_loss"][result.best_epoch])


# --- learning-rate schedule ---------------------------------------------------------------------


def test_warmup_cosine_rises_then_anneals_and_resumes_identically():
    factor = warmup_cosine_factor(epochs=6, warmup=2)
    assert [factor(e) for e in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factor(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 4)))
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_cosine_factor(epochs=3, warmup=3)

    settings = FitSettings(epochs=6, lr=1.0, lr_schedule="warmup_cosine", warmup_epochs=2)

    def run(epochs, state=None):
        parameter = nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([parameter], lr=settings.lr)
        scheduler = make_scheduler(optimizer, settings)
        if state is not None:
            optimizer.load_state_dict(state[0])
            scheduler.load_state_dict(state[1])
        lrs = []
        for _ in range(epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs, (optimizer.state_dict(), scheduler.state_dict())

    straight, _ = run(6)
    first, state = run(3)
    rest, _ = run(3, state)
    assert first + rest == pytest.approx(straight)
    assert straight == pytest.approx([1 / 3, 2 / 3, 1.0, factor(3), factor(4), factor(5)])


# --- the segmentation voter and slice smoothing -------------------------------------------------


def test_segmentation_voter_on_fixed_probabilities():
    rows = pd.DataFrame(
        {
            "id": ["a0", "a1", "a2", "b0"],
            "patient": ["a", "a", "a", "b"],
            "slice_index": [0, 1, 2, 0],
            "has_tumor": [1, 1, 0, 0],
        }
    )
    stored = np.zeros((4, 6, 6), dtype=np.uint8)
    stored[0, :3, :3] = 200  # 9 px above 0.5
    stored[1, :2, :2] = 130  # 4 px just above 0.5 (130/255 = 0.51), touching slice 0's blob
    stored[1, 5, 5] = 255  # 1 px, isolated
    stored[2, 5, 0] = 127  # below the threshold
    stored[3, 0, 0] = 255  # patient b: 1 px
    areas = mask_areas(stored, rows, 0.5, PostProcess())
    assert areas.tolist() == [9, 5, 0, 1]
    cleaned = mask_areas(stored, rows, 0.5, PostProcess(min_component_voxels=2))
    assert cleaned.tolist() == [9, 4, 0, 0]
    table = voter_table(rows, cleaned, min_pixels=4)
    assert table["pred"].tolist() == [1, 1, 0, 0] and table["label"].tolist() == [1, 1, 0, 0]
    assert table["prob_tumor"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert voter_decisions(areas, 6).tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="at least 1"):
        voter_decisions(areas, 0)
    # As one more voter: 3 backbones split 2:1 against, the voter makes it a tie, broken by
    # the mean probability.
    preds = np.array([[0], [0], [1], voter_decisions(np.array([9]), 4)])
    probs = np.array([[0.4], [0.45], [0.9], [1.0]])
    pred, _, votes = vote(preds, probs, "majority", 0.5)
    assert votes.tolist() == [2] and pred.tolist() == [1]


def test_min_pixels_is_chosen_on_validation():
    areas = np.array([0, 3, 0, 40, 12, 2, 25])
    truth = np.array([0, 0, 0, 1, 1, 0, 1])
    k, accuracy = choose_min_pixels(areas, truth)
    assert k == 4 and accuracy == 1.0  # smallest k separating 3 (empty) from 12 (tumor)
    k, accuracy = choose_min_pixels(np.array([0, 0]), np.array([0, 1]))
    assert k == 1 and accuracy == 0.5


def test_smoothing_follows_each_patients_slice_order_and_its_edges():
    # Patient p in slice order 0..4 has decisions 1 0 1 1 0 but rows are shuffled.
    patients = np.array(["p", "p", "p", "p", "p", "q", "q"])
    slices = np.array([4, 0, 2, 1, 3, 0, 1])
    decisions = np.array([0, 1, 1, 0, 1, 1, 0])
    out = smooth_decisions(decisions, patients, slices, 3)
    # In order: 1 0 1 1 0 -> edge slice 0 window (1,0) tie keeps 1; slice 1 (1,0,1) -> 1;
    # slice 2 (0,1,1) -> 1; slice 3 (1,1,0) -> 1; edge slice 4 (1,0) tie keeps 0.
    expected = np.empty(7, dtype=int)
    expected[[1, 3, 2, 4, 0]] = [1, 1, 1, 1, 0]
    expected[5:] = [1, 0]  # q: two slices, ties keep their own decisions
    assert out.tolist() == expected.tolist()
    assert smooth_decisions(decisions, patients, slices, 1).tolist() == decisions.tolist()
    with pytest.raises(ValueError, match="odd"):
        smooth_decisions(decisions, patients, slices, 2)


# --- missing-sequence robustness ----------------------------------------------------------------


def test_modality_dropout_copies_flair_into_the_drawn_sequences():
    images = torch.stack([torch.full((4, 4), float(c)) for c in range(3)]).repeat(64, 1, 1, 1)
    assert replace_sequences(images, 0.0, torch.Generator()) is images
    out = replace_sequences(images, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 1], images[:, 1])  # FLAIR itself never changes
    changed = (out != images).flatten(2).any(2)  # (B, 3): which channels changed
    patterns = {tuple(row.tolist()) for row in changed}
    assert patterns == {
        (False, False, False),
        (True, False, False),
        (False, False, True),
        (True, False, True),
    }
    assert torch.equal(out[changed[:, 0], 0], images[changed[:, 0], 1])
    assert 16 < int(changed.any(1).sum()) < 48  # about half of the 64 images
    again = replace_sequences(images, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    batches = [(images[:2], torch.zeros(2)), (images[2:4], torch.ones(2))]
    assert len(list(with_modality_dropout(iter(batches), 1.0, torch.Generator()))) == 2


def test_test_dice_is_reported_per_sequence_group():
    rows = pd.DataFrame(
        {
            "patient": ["a", "a", "b", "b", "c"],
            "missing_modalities": ["", "", "pre-contrast", "pre-contrast", ""],
        }
    )
    frame = pd.DataFrame({"dice": [0.8, 1.0, 0.2, 0.4, 0.6], "has_tumor": [1, 0, 1, 1, 1]})
    volume = pd.Series({"a": 0.9, "b": 0.3, "c": 0.5})
    report = by_sequences(rows, frame, volume)
    assert report["all_sequences"] == {
        "patients": 2,
        "tumor_slices": 2,
        "dice_tumor_slices": pytest.approx(0.7),
        "volume_dice": pytest.approx(0.7),
    }
    assert report["missing_sequence"]["patients"] == 1
    assert report["missing_sequence"]["dice_tumor_slices"] == pytest.approx(0.3)
    assert report["missing_sequence"]["volume_dice"] == pytest.approx(0.3)
    none_missing = by_sequences(rows.assign(missing_modalities=""), frame, volume)
    assert none_missing["missing_sequence"]["volume_dice"] is None


# --- 2.5D input -------------------------------------------------------------------------------


def test_neighbouring_slices_are_stacked_with_edges_repeated():
    # Patient a has slices 0..3 in shuffled rows, patient b one slice.
    patients = np.array(["a", "a", "b", "a", "a"])
    slices = np.array([2, 0, 0, 3, 1])
    images = np.zeros((5, 2, 2, 3), dtype=np.uint8)
    for row, value in enumerate([20, 0, 99, 30, 10]):  # a: slice k has value 10 k
        images[row] = value
    stacked = stack_neighbours(images, patients, slices, 1)
    assert stacked.shape == (5, 2, 2, 9) and stacked.dtype == np.uint8
    windows = stacked[:, 0, 0, ::3].tolist()  # first channel of slices i-1, i, i+1
    assert windows == [[10, 20, 30], [0, 0, 10], [99, 99, 99], [20, 30, 30], [0, 10, 20]]
    assert stack_neighbours(images, patients, slices, 0) is images
    assert input_channels({"slice_context": 2}) == 15 and input_channels({}) == 3


def test_2_5d_segmenters_are_built_for_their_input_channels():
    from brainmri.errors import ConfigError
    from brainmri.models import build_segmenter, check_segmenter_config

    settings = {"arch": "Unet", "encoder": "resnet18", "input_size": 64, "slice_context": 1}
    model = build_segmenter(settings).eval()
    assert model.mean.shape == (1, 9, 1, 1)
    with torch.no_grad():
        assert model(torch.rand(1, 9, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ConfigError, match="pretrained: false"):
        check_segmenter_config({**settings, "pretrained": True}, key="segmentation.x")
