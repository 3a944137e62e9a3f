"""Volume prediction applies the segmentation recipe of evaluation and the fold ensemble: flip
TTA, per-volume 3-D post-processing at the models' array size (the mask then back in the input's
geometry), and 2.5D segmenters fed each slice's neighbours. Also: single-image predict applies
TTA and refuses 2.5D models in one line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import run_script, snakemake
from PIL import Image
from test_volume import SHAPE, affine_of, three_files

from brainmri.evaluation.decision import Decision, EnsembleRule
from brainmri.evaluation.masks import binarize, mean_probabilities, quantize
from brainmri.evaluation.postprocess import PostProcess, clean_patients
from brainmri.inference.ensemble import EnsembleModels
from brainmri.inference.segment import probabilities_of, segment_and_count
from brainmri.inference.volume import predict_volume, predict_volumes, slice_rows
from brainmri.inference.volume_io import read_input, read_kaggle_folder

SIZE = 64  # the models' array size; the slice folders below are 64 x 64: no resampling
SLICES = 10
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A classifier that calls every slice tumor, two random 2-D U-Nets (two folds, not
    flip-equivariant) and a random 2.5D U-Net (slice_context 1); input 32 px, arrays 64 px."""
    from brainmri.models import build_classifier, build_segmenter, save_checkpoint

    root = tmp_path_factory.mktemp("recipe_models")
    preprocessing = {"array_size": SIZE}
    cls = {"backbone": "resnet10t", "input_size": 32, "pretrained": False}
    torch.manual_seed(0)
    classifier = build_classifier(cls)
    with torch.no_grad():
        last = classifier.net[1][-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-5.0, 5.0]))
    save_checkpoint(root / "c.pt", classifier, "classification", cls, preprocessing=preprocessing)
    paths = {"classifier": root / "c.pt"}
    seg = {"name": "unet", "arch": "Unet", "encoder": "resnet18", "input_size": 32}
    for name, settings in (
        ("fold0", seg),
        ("fold1", seg),
        ("context", {**seg, "slice_context": 1}),
    ):
        torch.manual_seed(len(paths))
        save_checkpoint(
            root / f"{name}.pt",
            build_segmenter(settings),
            "segmentation",
            settings,
            preprocessing=preprocessing,
        )
        paths[name] = root / f"{name}.pt"
    return paths


def slice_folder(root, name="TCGA_CS_0003_20000101", seed=0):
    """A Kaggle-layout patient of SLICES 64 x 64 RGB slices with a bright blob."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for k in range(SLICES):
        rgb = rng.integers(20, 90, (SIZE, SIZE, 3))
        blob = (yy - 30) ** 2 + (xx - 26 - k) ** 2 < (6 + k % 4) ** 2
        rgb[blob] = 230
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{name}_{k + 1}.tif")
    return folder


def ensemble(models, segmenters, tta):
    rule = EnsembleRule("majority", 0.5)
    return EnsembleModels([models["classifier"]], segmenters, rule, CPU, tta)


def test_volume_mask_equals_the_fold_ensemble_path_with_tta(models, tmp_path):
    """The volume path with TTA and post-processing gives, slice for slice, the mask of the
    evaluation path: evaluate_segmenter's probabilities (stored uint8), the fold ensemble's
    mean, threshold, per-patient clean-up."""
    volume = read_kaggle_folder(slice_folder(tmp_path))
    folds = [models["fold0"], models["fold1"]]
    post = PostProcess(min_component_voxels=20)
    result = predict_volume(volume, ensemble(models, folds, True), SIZE, 0.5, post)

    np.save(tmp_path / "images.npy", volume.slices)
    np.save(tmp_path / "masks.npy", np.zeros(volume.slices.shape[:3], dtype=np.uint8))
    rows = slice_rows(volume).assign(source="lgg", array_index=np.arange(SLICES))
    files = ({"lgg": tmp_path / "images.npy"}, {"lgg": tmp_path / "masks.npy"})
    stored = [segment_and_count([f], rows, *files, 1, 0.5, True).stored for f in folds]
    expected = clean_patients(binarize(mean_probabilities(stored), 0.5), rows, post)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(result.mask, expected)
    np.testing.assert_array_equal(result.per_slice["tumor_voxels"], expected.sum(axis=(1, 2)))
    assert result.summary["tta"] is True and result.summary["min_component_voxels"] == 20

    # TTA is really applied: these random models are not flip-equivariant.
    plain = predict_volume(volume, ensemble(models, folds, False), SIZE, 0.5, post)
    assert plain.summary["tta"] is False
    assert not np.array_equal(plain.mask, result.mask)


class HandMade:
    """Every slice called tumor; the segmentation is a fixed stored probability volume."""

    tta = False
    rule = EnsembleRule("majority", 0.5)
    voters = ("hand",)

    def __init__(self, stored, no_tumor=()):
        self.stored, self.no_tumor = stored, list(no_tumor)

    def place(self, images):
        return None

    def decide(self, images, areas, order, placed=None):
        decision = np.ones(len(images), dtype=int)
        decision[self.no_tumor] = 0
        return Decision(decision, decision.astype(float), decision, None, False)

    def segment(self, images, rows, placed=None):
        assert self.stored.shape == images.shape[:3]
        return self.stored


def hand_made_volume():
    """(20, 64, 64) uint8 at the array size: a large blob (slices 8-13), a 27-voxel cube far
    from it (slices 2-4) and a single voxel at slice 17."""
    stored = np.full((SHAPE[2], SIZE, SIZE), 10, dtype=np.uint8)
    stored[8:14, 20:40, 18:42] = 230
    stored[2:5, 52:55, 52:55] = 230
    stored[17, 5, 5] = 230
    return stored


def nifti_run(tmp_path, name, post, no_tumor=()):
    out = tmp_path / name
    patient = tmp_path / "p1"
    if not patient.exists():
        three_files(patient, affine_of())
    failures = predict_volumes(
        [(str(patient), lambda: read_input(patient, "axial"))],
        HandMade(hand_made_volume(), no_tumor),
        SIZE,
        0.5,
        out / "patients",
        out / "volumes.csv",
        post,
    )
    assert failures == []
    row = pd.read_csv(out / "volumes.csv", keep_default_na=False).iloc[0]
    image = nib.load(out / "patients" / "p1" / "mask.nii.gz")
    source = nib.load(patient / "case_flair.nii.gz")
    assert image.shape == source.shape == SHAPE
    np.testing.assert_array_equal(image.affine, source.affine)
    assert image.header.get_zooms() == source.header.get_zooms()
    assert image.header["sform_code"] == source.header["sform_code"]
    return np.asanyarray(image.dataobj).astype(bool), row


def test_postprocess_drops_small_far_components_in_the_input_geometry(tmp_path):
    off, row_off = nifti_run(tmp_path, "off", PostProcess())
    on, row_on = nifti_run(tmp_path, "on", PostProcess(min_component_voxels=28))
    # RAS input sliced axially: display slice k is the input's z = k.
    for z in (2, 3, 4, 17):
        assert off[..., z].any() and not on[..., z].any()
    np.testing.assert_array_equal(on[..., 8:14], off[..., 8:14])
    assert not (on & ~off).any()
    assert row_off["postprocess_removed_voxels"] == 0
    assert row_on["postprocess_removed_voxels"] == off.sum() - on.sum() > 0
    assert row_on["tumor_voxels"] == on.sum()
    assert (row_on["first_tumor_slice"], row_on["last_tumor_slice"]) == (8, 13)
    assert (row_off["first_tumor_slice"], row_off["last_tumor_slice"]) == (2, 17)
    assert row_on["min_component_voxels"] == 28 and str(row_on["keep_largest"]) == "False"
    assert str(row_on["tta"]) == "False"
    slices = pd.read_csv(tmp_path / "on" / "patients" / "p1" / "slices.csv")
    assert (slices["segmentation_area_px"] > 0).tolist() == [8 <= k < 14 for k in range(20)]
    assert (slices["segmentation_voter"].isna()).all()  # no voter in this ensemble
    # A cube of exactly 27 voxels stays at min_component_voxels 27 (the single voxel goes).
    kept, _ = nifti_run(tmp_path, "at27", PostProcess(min_component_voxels=27))
    assert kept[..., 2:5].any() and not kept[..., 17].any()


def test_masks_are_cleaned_before_the_classifier_gate_as_in_the_cascade(tmp_path):
    """The 27-voxel cube spans slices 2-4; the classifier drops slice 3. Cleaned first (as the
    cascade does), the cube survives min_component_voxels 20 and loses only slice 3; gated
    first, its two 9-voxel pieces would both be dropped."""
    off, _ = nifti_run(tmp_path, "off", PostProcess())
    mask, row = nifti_run(tmp_path, "gated", PostProcess(min_component_voxels=20), no_tumor=[3])
    assert not mask[..., 3].any() and not mask[..., 17].any()
    np.testing.assert_array_equal(mask[..., [2, 4]], off[..., [2, 4]])
    assert mask[..., 2].any()
    assert row["postprocess_removed_voxels"] == off[..., 17].sum()


def test_keep_largest_keeps_only_the_largest_3d_component(tmp_path):
    off, _ = nifti_run(tmp_path, "off", PostProcess())
    largest, row = nifti_run(tmp_path, "largest", PostProcess(keep_largest=True))
    assert largest.any() and not largest[..., :8].any() and not largest[..., 14:].any()
    np.testing.assert_array_equal(largest[..., 8:14], off[..., 8:14])
    assert str(row["keep_largest"]) == "True" and row["min_component_voxels"] == 0


def test_2_5d_segmenter_gets_each_slices_neighbours(models, tmp_path):
    volume = read_kaggle_folder(slice_folder(tmp_path))
    seg = ensemble(models, [models["context"]], False)
    rows = slice_rows(volume)
    stored = seg.segment(volume.slices, rows)
    assert stored.shape == (SLICES, SIZE, SIZE) and stored.dtype == np.uint8
    np.testing.assert_array_equal(
        stored, quantize(probabilities_of([models["context"]], volume.slices, CPU, False, rows)[0])
    )
    changed = volume.slices.copy()
    changed[5] = 255 - changed[5]
    differs = [
        not np.array_equal(a, b) for a, b in zip(seg.segment(changed, rows), stored, strict=True)
    ]
    assert differs == [k in (4, 5, 6) for k in range(SLICES)]  # context 1: i - 1 .. i + 1


def test_cli_passes_tta_postprocess_and_runs_a_2_5d_model(models, tmp_path):
    folder = slice_folder(tmp_path)
    out = tmp_path / "out"
    common = (
        *("--inputs", folder, "--classifiers", models["classifier"]),
        *("--segmenters", models["context"], "--method", "majority"),
        *("--classifier-threshold", 0.5, "--segmentation-threshold", 0.5),
    )
    bad = run_script(
        "predict_volume.py",
        *common,
        *("--postprocess", '{"keep_larges": true}', "--csv", out / "v.csv"),
        *("--patients-dir", out / "p"),
    )
    assert bad.returncode == 2 and "unknown key(s) keep_larges" in bad.stderr
    assert not out.exists()
    result = run_script(
        "predict_volume.py",
        *common,
        *("--tta", "--postprocess", '{"min_component_voxels": 4, "keep_largest": true}'),
        *("--csv", out / "v.csv", "--patients-dir", out / "p"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = pd.read_csv(out / "v.csv", keep_default_na=False).iloc[0]
    assert row["error"] == "" and row["slices"] == SLICES
    assert (str(row["tta"]), row["min_component_voxels"], str(row["keep_largest"])) == (
        "True",
        4,
        "True",
    )
    volume = read_kaggle_folder(folder)
    expected = predict_volume(
        volume,
        ensemble(models, [models["context"]], True),
        SIZE,
        0.5,
        PostProcess(4, True),
    )
    assert row["tumor_voxels"] == expected.mask.sum()


def test_single_image_predict_applies_tta_and_refuses_2_5d_models(models, tmp_path):
    from brainmri.inference.predict import predict_folder, prepare

    folder = slice_folder(tmp_path)
    files = sorted(folder.iterdir())
    images = np.stack([prepare(f, SIZE).image for f in files])
    masks = {}
    for tta in (False, True):
        out = tmp_path / f"tta{tta}"
        predict_folder(
            folder,
            [models["classifier"]],
            [models["fold0"]],
            EnsembleRule("majority", 0.5),
            0.5,
            out / "p.csv",
            out / "masks",
            out / "overlays",
            data_source="kaggle",
            tta=tta,
        )
        masks[tta] = np.stack(
            [np.asarray(Image.open(out / "masks" / f"{f.stem}.png")) > 0 for f in files]
        )
        expected = binarize(quantize(probabilities_of([models["fold0"]], images, CPU, tta)[0]), 0.5)
        np.testing.assert_array_equal(masks[tta], expected)
    assert not np.array_equal(masks[False], masks[True])
    result = run_script(
        "predict.py",
        *("--input-dir", folder, "--classifiers", models["classifier"]),
        *("--segmenters", models["context"], "--method", "majority"),
        *("--classifier-threshold", 0.5, "--segmentation-threshold", 0.5),
        *("--output", tmp_path / "c" / "p.csv", "--masks-dir", tmp_path / "c" / "m"),
        *("--overlays-dir", tmp_path / "c" / "o", "--data-source", "kaggle"),
    )
    assert result.returncode != 0
    assert "a 2.5D model (slice_context 1) needs each slice's neighbours" in result.stderr
    assert not (tmp_path / "c" / "p.csv").exists()


@pytest.mark.parametrize(
    ("segmentation", "expected"),
    [
        (
            {"tta": True, "postprocess": {"min_component_voxels": 7, "keep_largest": True}},
            ' --tta --postprocess \'{"keep_largest": true, "min_component_voxels": 7}\'',
        ),
        (
            {"tta": False, "postprocess": {"min_component_voxels": 0, "keep_largest": False}},
            ' --postprocess \'{"keep_largest": false, "min_component_voxels": 0}\'',
        ),
    ],
)
def test_rule_passes_the_recipe_from_the_config(tmp_path, segmentation, expected):
    import yaml

    extra = tmp_path / "extra.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "results_dir": str(tmp_path / "results"),
                "predict": {"volumes": [str(tmp_path)]},
                "segmentation": segmentation,
            }
        )
    )
    dry = snakemake(
        *("-n", "-p", "--cores", "1", "--configfile", "config/demo.yaml", str(extra)),
        *("--", "predict_volume"),
    )
    lines = [ln for ln in dry.stdout.splitlines() if "predict_volume.py" in ln]
    assert len(lines) == 1, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert f"--smooth-window 1{expected} --axis axial --csv" in " ".join(lines[0].split())
