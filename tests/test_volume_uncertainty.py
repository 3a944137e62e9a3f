"""Probability and disagreement beside each volume mask (brainmri.inference.uncertainty): exact
maps where no resampling happens, zero for identical fold models (stand-ins and real U-Nets),
the fold models' tumor volume range, the overview's shading."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import test_volume_recipe
from PIL import Image
from test_volume import FakeModels, affine_of, blob_volume, reader, save

from brainmri.evaluation.masks import quantize
from brainmri.inference.uncertainty import disagreement, shade
from brainmri.inference.volume import predict_volume, predict_volumes
from brainmri.inference.volume_io import read_kaggle_folder

models = test_volume_recipe.models  # the fixture: an always-tumor classifier, two random U-Nets
SIZE = 64
SHAPE = (64, 64, 12)  # in-plane = the models' size: no resampling, the maps are exact


class Folds(FakeModels):
    """FakeModels' probability as fold 0; the other folds derived from it by ``changes``."""

    def __init__(self, *changes):
        self.changes = changes

    def segment_folds(self, images, rows, placed=None):
        base = self.segment(images, rows, placed)
        return [base] + [change(base.copy()) for change in self.changes]


def lower_right_erased(stored):
    stored[:, 32:, 32:] = 0
    return stored


def patient(tmp_path):
    pre, flair, post, _ = blob_volume(SHAPE, center=(30, 30, 6), radii=(12, 10, 3.5))
    return save(np.stack([pre, flair, post], axis=-1), tmp_path / "case.nii.gz", affine_of())


def run(tmp_path, fake):
    path = patient(tmp_path)
    out = tmp_path / "out"
    failures = predict_volumes([reader(path)], fake, SIZE, 0.5, out / "patients", out / "v.csv")
    assert failures == []
    table = pd.read_csv(out / "v.csv", keep_default_na=False)
    folder = out / "patients" / "case"
    maps = {
        name: np.asanyarray(nib.load(folder / f"{name}.nii.gz").dataobj)
        for name in ("mask", "prob", "uncertainty")
    }
    return table.iloc[0], maps, pd.read_csv(folder / "slices.csv"), path


def test_identical_fold_models_have_zero_disagreement(tmp_path):
    row, maps, slices, path = run(tmp_path, Folds(lambda s: s, lambda s: s))
    assert row["fold_models"] == 3
    assert not maps["uncertainty"].any() and (slices["disagreement"] == 0).all()
    assert row["mean_disagreement"] == 0
    assert row["fold_tumor_ml_min"] == row["fold_tumor_ml_max"] == row["tumor_ml"] > 0
    # The probability map is the ensemble's, exactly (no resampling), in the input's geometry.
    source = nib.load(path)
    assert maps["prob"].dtype == np.uint8 and maps["prob"].shape == SHAPE
    np.testing.assert_array_equal(
        nib.load(tmp_path / "out/patients/case/prob.nii.gz").affine, source.affine
    )
    assert ((maps["prob"] >= 128) == maps["mask"].astype(bool)).all()


def test_disagreement_is_the_fold_models_std_and_the_volume_range_their_masks(tmp_path):
    row, maps, slices, _ = run(tmp_path, Folds(lower_right_erased))
    prob = maps["prob"].astype(float) / 255
    # Two folds, p and 0 in the erased corner: mean p/2, std p/2 (population std).
    # (the corner is in display orientation: rows posterior, columns to the patient's left)
    erased = maps["uncertainty"] > 0
    assert erased.any()
    np.testing.assert_allclose(maps["uncertainty"][erased] / 255, prob[erased], atol=1 / 255)
    full, corner = row["fold_tumor_voxels_max"], row["fold_tumor_voxels_min"]
    assert full > corner > 0 and full >= row["tumor_voxels"] >= corner
    voxel_ml = 0.9 * 1.1 * 2.5 / 1000
    assert row["fold_tumor_ml_max"] == pytest.approx(round(full * voxel_ml, 4))
    inside = maps["mask"].astype(bool)
    expected = (maps["uncertainty"][inside] / 255).mean()
    assert row["mean_disagreement"] == pytest.approx(expected, abs=1e-6) and expected > 0
    assert slices["disagreement"].max() > 0


def test_disagreement_by_hand():
    a = np.array([[0, 255], [100, 50]], dtype=np.uint8)
    b = np.array([[255, 255], [100, 150]], dtype=np.uint8)
    expected = np.std(np.stack([a, b]).astype(float) / 255, axis=0)
    np.testing.assert_array_equal(disagreement([a, b]), quantize(expected))
    assert not disagreement([a]).any() and not disagreement([a, a, a]).any()


def test_real_fold_models_identical_zero_different_not(models, tmp_path):
    folder = test_volume_recipe.slice_folder(tmp_path)
    volume = read_kaggle_folder(folder)
    same = test_volume_recipe.ensemble(models, [models["fold0"], models["fold0"]], False)
    other = test_volume_recipe.ensemble(models, [models["fold0"], models["fold1"]], False)
    zero = predict_volume(volume, same, SIZE, 0.5)
    assert zero.folds.fold_models == 2 and not zero.folds.disagreement.any()
    spread = predict_volume(volume, other, SIZE, 0.5)
    assert spread.folds.disagreement.max() > 0
    out = tmp_path / "out"
    predict_volumes([reader(folder)], other, SIZE, 0.5, out / "patients", out / "v.csv")
    written = out / "patients" / folder.name
    first = f"{folder.name}_1"
    probability = np.asarray(Image.open(written / "probability" / f"{first}_prob.png"))
    np.testing.assert_array_equal(probability, spread.folds.probability[0])
    assert (written / "uncertainty" / f"{first}_uncertainty.png").is_file()
    assert len(list((written / "uncertainty").iterdir())) == test_volume_recipe.SLICES


def test_overview_shading():
    tile = np.full((4, 4, 3), 100, dtype=np.uint8)
    assert np.array_equal(shade(tile, np.zeros((4, 4), np.uint8)), tile)
    full = shade(tile, np.full((4, 4), 128, np.uint8))
    np.testing.assert_array_equal(full[0, 0], np.round(0.15 * 100 + 0.85 * np.array([255, 200, 0])))
