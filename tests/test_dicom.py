"""DICOM in (brainmri.inference.dicom_io), DICOM-SEG out (dicom_seg): synthetic series written
with pydicom -- oblique, in reversed slice order, shuffled file names and InstanceNumbers -- with a
cube at known world coordinates; bad folders; a real sample patient converted to DICOM."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import test_volume_recipe
from dicom_series import array_affine, write_series
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless
from test_volume import reader, run

from brainmri.inference.dicom_io import DEFAULT_RULES, classify

models = test_volume_recipe.models  # the fixture: an always-tumor classifier, two random U-Nets

SHAPE = (64, 56, 24)  # columns, rows, slices
SPACING = (0.9, 0.8)  # PixelSpacing: between rows, between columns (mm)
THICKNESS = 2.0
CUBE_CENTER = np.array([5.0, -10.0, 20.0])  # LPS mm
CUBE_HALF = 9.0  # mm


def rotation(z_degrees: float, x_degrees: float) -> np.ndarray:
    a, b = np.radians(z_degrees), np.radians(x_degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def geometry(oblique: bool, reverse: bool) -> dict:
    turn = rotation(25, 15) if oblique else np.eye(3)
    row_dir, col_dir = turn @ [1.0, 0, 0], turn @ [0, 1.0, 0]
    normal = np.cross(row_dir, col_dir)
    half = np.array(SHAPE) / 2
    # The grid's centre falls on the cube's centre.
    origin = CUBE_CENTER - (
        row_dir * SPACING[1] * half[0] + col_dir * SPACING[0] * half[1] + normal * THICKNESS * 12
    )
    return {
        "origin": origin,
        "row_dir": row_dir,
        "col_dir": col_dir,
        "spacing": SPACING,
        "thickness": THICKNESS,
        "reverse": reverse,
    }


def in_cube(affine_lps: np.ndarray, shape) -> np.ndarray:
    """Which voxel centres of a grid lie in the world cube."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = ijk @ affine_lps[:3, :3].T + affine_lps[:3, 3]
    return (np.abs(world - CUBE_CENTER) <= CUBE_HALF).all(axis=-1)


def write_patient(folder, oblique=True, reverse=True, drop=(), seed=0):
    """Three series (FLAIR bright in the cube) -> {sequence: (series UID, array LPS affine)}."""
    geo = geometry(oblique, reverse)
    affine = array_affine(SHAPE[2], **geo)
    cube = in_cube(affine, SHAPE)
    rng = np.random.default_rng(seed)
    flair = np.where(cube, 240, 60 + rng.integers(0, 4, SHAPE)).astype(np.uint16)
    pre = np.full(SHAPE, 50, np.uint16) + rng.integers(0, 3, SHAPE).astype(np.uint16)
    post = (80 + 30 * cube).astype(np.uint16)
    written = {}
    for k, (name, sequence, data) in enumerate(
        (
            ("T1 AX PRE", "pre-contrast", pre),
            ("AX FLAIR", "FLAIR", flair),
            ("T1 AX POST GD", "post-contrast", post),
        )
    ):
        if sequence in drop:
            continue
        nested = folder / f"study/series{k}"  # any nesting
        written[sequence] = write_series(
            nested, data, name, seed=seed + k, series_number=k + 1, **geo
        )
    return written


def test_series_descriptions_name_the_sequences():
    expected = {
        "AX FLAIR": "FLAIR",
        "t2_tirm_tra_dark-fluid FLAIR": "FLAIR",
        "T1 AX PRE": "pre-contrast",
        "T1 SE pre-contrast": "pre-contrast",
        "T1 AX POST GD": "post-contrast",
        "T1+C": "post-contrast",
        "t1_mprage_tra_Gad": "post-contrast",
        "AX T1": "pre-contrast",
        "localizer": None,
        "DWI b1000": None,
    }
    assert {d: classify(d, DEFAULT_RULES) for d in expected} == expected


@pytest.mark.parametrize("oblique, reverse", [(True, True), (False, False), (True, False)])
def test_cube_comes_back_where_it_was_with_its_volume_and_a_seg(tmp_path, oblique, reverse):
    patient = tmp_path / "patient1"
    written = write_patient(patient, oblique, reverse)
    failures, table = run([reader(patient)], tmp_path / "out")
    assert failures == []
    row = table.iloc[0]
    out = tmp_path / "out" / "patients" / "patient1"
    image = nib.load(out / "mask.nii.gz")
    mask = np.asanyarray(image.dataobj).astype(bool)
    assert mask.shape == SHAPE
    # The affine is the DICOM grid's in ascending slice position, LPS -> RAS.
    uid = written["FLAIR"][0]
    ascending = array_affine(SHAPE[2], **{**geometry(oblique, False), "reverse": False})
    np.testing.assert_allclose(image.affine, np.diag([-1.0, -1, 1, 1]) @ ascending, atol=1e-6)
    # Round trip: the mask's voxels, placed in the world by its own affine, are the cube.
    truth = in_cube(np.diag([-1.0, -1, 1, 1]) @ image.affine, SHAPE)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice
    # mL from the DICOM spacing, against the voxel count and the cube's own volume.
    voxel_mm3 = SPACING[0] * SPACING[1] * THICKNESS
    assert row["tumor_ml"] == pytest.approx(round(mask.sum() * voxel_mm3 / 1000, 4))
    assert row["tumor_ml"] == pytest.approx((2 * CUBE_HALF) ** 3 / 1000, rel=0.12)
    assert row["spacing_mm"] == "0.8x0.9x2" and row["form"] == "dicom-3-series"
    assert row["missing_sequences"] == "" and row["dicom_seg"] == "patient1/seg.dcm"
    # The SEG references the FLAIR series, one frame per source slice, each the mask's slice.
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert seg.SegmentSequence[0].SegmentLabel == "tumor"
    sources = sorted((patient / "study" / "series1").iterdir())
    inverse = np.linalg.inv(image.affine)
    for path in sources:
        source = dcmread(path, stop_before_pixels=True)
        ras = np.diag([-1.0, -1, 1]) @ np.asarray(source.ImagePositionPatient, float)
        k = round(float((inverse[:3, :3] @ ras + inverse[:3, 3])[2]))
        frame = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
        )[0, ..., 0]
        np.testing.assert_array_equal(frame.astype(bool), mask[:, :, k].T)


def test_missing_sequence_is_replaced_by_flair_and_reported(tmp_path):
    full, partial = tmp_path / "full", tmp_path / "partial"
    write_patient(full)
    write_patient(partial, drop=("pre-contrast",))
    failures, table = run([reader(full), reader(partial)], tmp_path / "out")
    assert failures == []
    assert table.iloc[1]["missing_sequences"] == "pre-contrast"
    assert table.iloc[1]["form"] == "dicom-2-series"
    assert table.iloc[0]["tumor_voxels"] == table.iloc[1]["tumor_voxels"] > 0


def _rewrite(path, **changes):
    dataset = dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(path)
    return path


def test_bad_folders_are_one_line_each_and_nothing_partial(tmp_path):
    good = tmp_path / "good"
    write_patient(good)
    bad, expected = [], []

    def patient(name):
        folder = tmp_path / name
        write_patient(folder)
        bad.append(folder)
        return sorted((folder / "study" / "series1").iterdir())[3]

    victim = patient("sizes")
    dataset = dcmread(victim)
    dataset.Rows, dataset.Columns = 30, 30
    dataset.PixelData = np.zeros((30, 30), np.uint16).tobytes()
    dataset.save_as(victim)
    expected.append((victim, "30 x 30 pixels where the rest of its series"))
    victim = _rewrite(patient("spacing"), PixelSpacing=None)
    expected.append((victim, "no valid PixelSpacing"))
    victim = patient("syntax")
    dataset = dcmread(victim)
    dataset.file_meta.TransferSyntaxUID = JPEG2000Lossless
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a JPEG 2000 codestream"])
    dataset.save_as(victim)
    expected.append((victim, "corrupt JPEG 2000 Image Compression (Lossless Only) pixel data"))
    patient("stray")
    stray = tmp_path / "stray" / "study" / "notes.txt"
    stray.write_text("reading notes")
    expected.append((stray, "not a DICOM file"))
    patient("second")
    extra = tmp_path / "second" / "study" / "flair_coronal"  # found first: sorted paths
    write_series(extra, np.zeros((8, 8, 3), np.uint16), "COR FLAIR", seed=9)
    axial = sorted((tmp_path / "second" / "study" / "series1").iterdir())[0]
    expected.append((axial, "a second FLAIR series ('AX FLAIR'; first: 'COR FLAIR'"))
    grid = tmp_path / "grid"
    write_patient(grid, drop=("post-contrast",))
    bad.append(grid)
    moved = grid / "study" / "series2"
    write_series(moved, np.zeros((64, 56, 24), np.uint16), "T1 POST", seed=7, thickness=3.0)
    expected.append((moved, "not on the FLAIR series' grid (the same size"))  # a file of it
    failures, table = run([reader(good), *map(reader, bad)], tmp_path / "out")
    assert len(failures) == len(bad)
    for (_, line), (path, text) in zip(failures, expected, strict=True):
        named = line.startswith(f"{path}: ") or line.startswith(f"{path}/")
        assert named and text in line and "\n" not in line, line
    assert [p.name for p in (tmp_path / "out" / "patients").iterdir()] == ["good"]
    assert list(table["error"] != "") == [False] + [True] * len(bad)


@pytest.mark.realdata
def test_real_sample_patient_as_dicom_gives_the_slice_folders_mask(models, tmp_path):
    """A real Kaggle patient (../shared/data/kaggle-mini), each channel of its TIFFs written as
    a DICOM series (axial, slice n at z = 2.5 n mm, shuffled names): the same mask as its
    slice folder, slice by slice, with two random fold models (a non-trivial mask)."""
    import zipfile

    from test_realdata_sample import SAMPLE

    if SAMPLE is None:
        pytest.skip("the real sample ../shared/data/kaggle-mini is absent")
    with zipfile.ZipFile(SAMPLE / "lgg-mri-segmentation.zip") as archive:
        names = [
            n for n in archive.namelist() if n.startswith("kaggle_3m/TCGA_") and n[-4:] == ".tif"
        ]
        patient = sorted(n.split("/")[1] for n in names)[0]
        archive.extractall(tmp_path, [n for n in names if n.split("/")[1] == patient])
    folder = tmp_path / "kaggle_3m" / patient
    count = len([p for p in folder.iterdir() if not p.name.endswith("_mask.tif")])
    rgb = np.stack(
        [np.asarray(Image.open(folder / f"{patient}_{n}.tif")) for n in range(1, count + 1)]
    )  # (slices, rows, columns, 3)
    dicom = tmp_path / "dicom" / f"{patient}_dicom"
    for c, name in enumerate(("T1 PRE", "FLAIR", "T1 POST GD")):
        voxels = np.transpose(rgb[..., c], (2, 1, 0))  # (columns, rows, slices)
        write_series(
            dicom / name.replace(" ", "_"),
            voxels,
            name,
            seed=c,
            bits=8,
            origin=(-120.0, -120.0, 2.5),
            thickness=2.5,
        )
    ensemble = test_volume_recipe.ensemble(models, [models["fold0"], models["fold1"]], False)
    out = tmp_path / "out"
    from brainmri.inference.volume import predict_volumes

    failures = predict_volumes(
        [reader(folder), reader(dicom)], ensemble, 64, 0.5, out / "patients", out / "v.csv"
    )
    assert failures == []
    table = pd.read_csv(out / "v.csv", keep_default_na=False)
    assert table.iloc[0]["tumor_voxels"] == table.iloc[1]["tumor_voxels"] > 0
    from_dicom = np.asanyarray(nib.load(out / "patients" / dicom.name / "mask.nii.gz").dataobj)
    masks = out / "patients" / patient
    assert from_dicom.shape == (256, 256, count)
    for n in range(1, count + 1):
        png = np.asarray(Image.open(masks / "masks" / f"{patient}_{n}_mask.png")) > 0
        np.testing.assert_array_equal(from_dicom[:, :, n - 1].T.astype(bool), png)


def test_rule_passes_the_limits_and_series_rules_from_the_config(tmp_path):
    import json

    import yaml
    from helpers import snakemake

    rules = [{"sequence": "FLAIR", "pattern": "dark.fluid"}]
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "results_dir": str(tmp_path / "results"),
                "predict": {
                    "volumes": [str(tmp_path)],
                    "limits": {"max_slices": 300},
                    "dicom": {"series": rules},
                },
            }
        )
    )
    dry = snakemake(
        *("-n", "-p", "--cores", "1", "--configfile", "config/demo.yaml", str(extra)),
        *("--", "predict_volume"),
    )
    line = " ".join(next(ln for ln in dry.stdout.splitlines() if "predict_volume.py" in ln).split())
    limits = {
        "max_bytes": 1 << 30,
        "max_image_pixels": 4096 * 4096,
        "max_in_plane": 1024,
        "max_slices": 300,
    }
    assert f"--limits '{json.dumps(limits, sort_keys=True)}'" in line
    assert f"--dicom-series '{json.dumps(rules, sort_keys=True)}'" in line
