"""Volume prediction (brainmri.inference.volume*, workflow_scripts/predict_volume.py) on generated
NIfTI volumes and slice folders with a known spacing and a known tumor blob."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_main_configures_torch, load_script, record_torch_setup, run_script
from PIL import Image

from brainmri.errors import InputError
from brainmri.evaluation.decision import Decision, EnsembleRule
from brainmri.evaluation.masks import quantize
from brainmri.inference.volume import predict_volumes
from brainmri.inference.volume_io import read_input, read_kaggle_folder

SHAPE = (80, 72, 20)  # x, y, z voxels
SPACING = (0.9, 1.1, 2.5)  # mm
SIZE = 64  # the models' preprocessed size (in-plane resampling 80 -> 64 -> 80)


class FakeModels:
    """Deterministic stand-in for the ensembles: a slice is tumor where FLAIR is bright."""

    tta = False
    rule = EnsembleRule("majority", 0.5)
    voters = ("a", "b", "c")

    def place(self, images):
        return None

    def decide(self, images, areas, order, placed=None):
        bright = (images[..., 1] > 160).reshape(len(images), -1)
        decision = bright.any(axis=1).astype(int)
        return Decision(decision, bright.mean(axis=1), decision * 3, None, False)

    def segment(self, images, rows, placed=None):
        flair = images[..., 1].astype(np.float32)
        return quantize(np.clip((flair - 64) / (255 - 64), 0, 1))


def blob_volume(shape=SHAPE, center=(40, 30, 11), radii=(14, 10, 4.5)):
    """Head-like background with an ellipsoid tumor (FLAIR 240) -> (pre, flair, post, blob)."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    head = sum(((g - n / 2) / (n / 2.2)) ** 2 for g, n in zip(grid[:2], shape[:2], strict=True)) < 1
    blob = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True)) <= 1
    rng = np.random.default_rng(0)
    flair = np.where(head, 60.0 + rng.normal(0, 2, shape), 0.0)
    flair[blob] = 240.0
    pre = np.where(head, 50.0, 0.0) + 0.5
    post = np.where(head, 80.0, 0.0) + np.where(blob, 30.0, 0.0)
    return pre.astype(np.float32), flair.astype(np.float32), post.astype(np.float32), blob


def affine_of(spacing=SPACING, codes="RAS"):
    affine = np.diag([*spacing, 1.0])
    if codes == "LPS":
        affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
    affine[:3, 3] = (-30.0, 12.0, 5.0)
    return affine


def save(array, path, affine):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def three_files(folder, affine, parts=None, drop=()):
    folder.mkdir(parents=True)
    pre, flair, post, _ = parts or blob_volume()
    for name, data in (("pre", pre), ("flair", flair), ("post", post)):
        if name not in drop:
            save(data, folder / f"case_{name}.nii.gz", affine)
    return folder


def run(readers, out):
    failures = predict_volumes(
        readers, FakeModels(), SIZE, 0.5, out / "patients", out / "volumes.csv"
    )
    return failures, pd.read_csv(out / "volumes.csv", keep_default_na=False)


def reader(path, axis="axial"):
    return (str(path), lambda: read_input(path, axis))


def test_mask_in_input_geometry_and_volume_in_ml(tmp_path):
    affine = affine_of()
    patient = three_files(tmp_path / "p1", affine)
    failures, table = run([reader(patient)], tmp_path / "out")
    assert failures == []
    row = table.iloc[0]
    blob = blob_volume()[3]
    mask_image = nib.load(tmp_path / "out" / "patients" / "p1" / "mask.nii.gz")
    source = nib.load(patient / "case_flair.nii.gz")
    assert mask_image.shape == source.shape == SHAPE
    np.testing.assert_array_equal(mask_image.affine, source.affine)
    assert mask_image.header.get_zooms() == source.header.get_zooms()
    assert mask_image.header["sform_code"] == source.header["sform_code"]
    mask = np.asanyarray(mask_image.dataobj)
    assert set(np.unique(mask)) == {0, 1}
    voxel_ml = np.prod(SPACING) / 1000
    true_ml = blob.sum() * voxel_ml
    # Resampling 80 -> 64 -> 80 px moves the boundary by at most about one voxel.
    assert row["tumor_ml"] == pytest.approx(true_ml, rel=0.08)
    assert row["tumor_voxels"] == int(mask.sum())
    dice = 2 * (mask.astype(bool) & blob).sum() / (mask.sum() + blob.sum())
    assert dice > 0.9
    tumor_z = np.flatnonzero(blob.any(axis=(0, 1)))
    assert (row["first_tumor_slice"], row["last_tumor_slice"]) == (tumor_z[0], tumor_z[-1])
    assert row["form"] == "nifti-3-files" and row["missing_sequences"] == ""
    assert row["true_tumor_voxels"] == ""
    assert row["spacing_mm"] == "0.9x1.1x2.5" and row["shape"] == "80x72x20"
    slices = pd.read_csv(tmp_path / "out" / "patients" / "p1" / "slices.csv")
    assert list(slices["slice"]) == list(range(SHAPE[2]))
    np.testing.assert_array_equal(slices["tumor_voxels"], mask.sum(axis=(0, 1)))
    assert (tmp_path / "out" / "patients" / "p1" / "overview.png").is_file()


def test_slice_order_preserved_along_a_permuted_flipped_axis(tmp_path):
    """LPS voxels with the axial axis first: slices are taken along it, in the voxel order."""
    pre, flair, post, blob = (np.transpose(a, (2, 0, 1)) for a in blob_volume())
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = -0.9, -1.1, 2.5, 1
    volume = np.stack([pre, flair, post], axis=-1)
    path = save(volume, tmp_path / "case.nii.gz", affine)
    failures, table = run([reader(path)], tmp_path / "out")
    assert failures == []
    mask = np.asanyarray(nib.load(tmp_path / "out" / "patients" / "case" / "mask.nii.gz").dataobj)
    assert mask.shape == blob.shape
    tumor_z = np.flatnonzero(blob.any(axis=(1, 2)))
    row = table.iloc[0]
    assert (row["first_tumor_slice"], row["last_tumor_slice"]) == (tumor_z[0], tumor_z[-1])
    dice = 2 * (mask.astype(bool) & blob).sum() / (mask.sum() + blob.sum())
    assert dice > 0.9
    slices = pd.read_csv(tmp_path / "out" / "patients" / "case" / "slices.csv")
    np.testing.assert_array_equal(slices["tumor_voxels"], mask.sum(axis=(1, 2)))
    # Coronal slices of 2.5 mm axial slices would be stretched 2.8:1: refused, not resliced.
    failures, _ = run([reader(path, "coronal")], tmp_path / "coronal")
    assert len(failures) == 1 and "stretched 2.8:1" in failures[0][1]
    assert "--axis axial" in failures[0][1]
    assert not any((tmp_path / "coronal" / "patients").iterdir())


def test_three_files_and_one_file_give_identical_results(tmp_path):
    affine = affine_of(codes="LPS")
    pre, flair, post, _ = blob_volume()
    folder = three_files(tmp_path / "three", affine)
    one = save(np.stack([pre, flair, post], axis=-1), tmp_path / "one.nii.gz", affine)
    failures, table = run([reader(folder), reader(one)], tmp_path / "out")
    assert failures == []
    a, b = table.iloc[0], table.iloc[1]
    for key in ("tumor_voxels", "tumor_ml", "first_tumor_slice", "last_tumor_slice", "shape"):
        assert a[key] == b[key]
    patients = tmp_path / "out" / "patients"
    masks = [nib.load(patients / p / "mask.nii.gz") for p in ("three", "one")]
    np.testing.assert_array_equal(masks[0].get_fdata(), masks[1].get_fdata())
    np.testing.assert_array_equal(masks[0].affine, masks[1].affine)
    pd.testing.assert_frame_equal(
        pd.read_csv(patients / "three" / "slices.csv"), pd.read_csv(patients / "one" / "slices.csv")
    )


def test_missing_sequence_is_replaced_by_flair_and_reported(tmp_path):
    affine = affine_of()
    _, flair, post, _ = blob_volume()
    folder = three_files(tmp_path / "nopre", affine, drop=("pre",))
    same = save(np.stack([flair, flair, post], axis=-1), tmp_path / "same.nii.gz", affine)
    volume = read_input(folder, "axial")
    assert volume.missing == ["pre-contrast"]
    np.testing.assert_array_equal(volume.slices[..., 0], volume.slices[..., 1])
    same_volume = read_input(same, "axial")
    np.testing.assert_array_equal(volume.slices, same_volume.slices)
    assert same_volume.missing == ["pre-contrast"]  # equal to FLAIR: missing, as in training
    _, table = run([reader(folder)], tmp_path / "out")
    assert table.iloc[0]["missing_sequences"] == "pre-contrast"


def test_kaggle_folder_in_slice_number_order(tmp_path):
    folder = tmp_path / "TCGA_CS_0001_20000101"
    folder.mkdir()
    pre, flair, post, blob = (np.transpose(a, (2, 1, 0))[:12] for a in blob_volume())
    rgb = np.stack([pre, flair, post], axis=-1).clip(0, 255).astype(np.uint8)
    for k in range(12):  # 1..12: "10" sorts before "2" by name
        Image.fromarray(rgb[k]).save(folder / f"{folder.name}_{k + 1}.tif")
        Image.fromarray((blob[k] * 255).astype(np.uint8)).save(
            folder / f"{folder.name}_{k + 1}_mask.tif"
        )
    volume = read_kaggle_folder(folder)
    assert volume.slice_numbers == list(range(1, 13))
    np.testing.assert_array_equal(volume.slices, rgb)
    failures, table = run([reader(folder)], tmp_path / "out")
    assert failures == []
    row = table.iloc[0]
    tumor = np.flatnonzero(blob.any(axis=(1, 2))) + 1
    assert (row["first_tumor_slice"], row["last_tumor_slice"]) == (tumor[0], tumor[-1])
    assert row["tumor_ml"] == "" and row["spacing_mm"] == ""
    assert row["true_tumor_voxels"] == blob.sum()  # from the _mask.tif files
    masks_dir = tmp_path / "out" / "patients" / folder.name / "masks"
    written = np.stack(
        [np.asarray(Image.open(masks_dir / f"{folder.name}_{k + 1}_mask.png")) for k in range(12)]
    )
    assert written.shape == blob.shape
    assert int((written > 0).sum()) == row["tumor_voxels"]
    dice = 2 * ((written > 0) & blob).sum() / ((written > 0).sum() + blob.sum())
    assert dice > 0.9


# --- bad input and the real models, through the CLI -----------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A randomly initialised classifier and U-Net (input size 32, data size 64), their last
    layers set to call every slice tumor and every pixel tumor: a known answer."""
    from brainmri.models import build_classifier, build_segmenter, save_checkpoint

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cls = {"backbone": "resnet10t", "input_size": 32, "pretrained": False}
    seg = {"name": "unet", "arch": "Unet", "encoder": "resnet18", "input_size": 32}
    classifier, segmenter = build_classifier(cls), build_segmenter(seg)
    with torch.no_grad():
        last = classifier.net[1][-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-5.0, 5.0]))
        head = segmenter.net.segmentation_head[0]
        head.weight.zero_()
        head.bias.fill_(5.0)
    preprocessing = {"array_size": SIZE}
    save_checkpoint(root / "c.pt", classifier, "classification", cls, preprocessing=preprocessing)
    save_checkpoint(root / "s.pt", segmenter, "segmentation", seg, preprocessing=preprocessing)
    return root / "c.pt", root / "s.pt"


def cli_args(checkpoints, out, *inputs) -> list:
    return [
        *("--inputs", *inputs, "--classifiers", checkpoints[0]),
        *("--segmenters", checkpoints[1], "--method", "majority"),
        *("--classifier-threshold", 0.5, "--segmentation-threshold", 0.5),
        *("--csv", out / "volumes.csv", "--patients-dir", out / "patients"),
    ]


def cli(checkpoints, out, *inputs):
    return run_script("predict_volume.py", *cli_args(checkpoints, out, *inputs))


def test_the_job_configures_torch_with_its_threads_on_its_device(
    checkpoints, tmp_path, monkeypatch
):
    """predict_volume.py (run in-process) calls configure_torch (the job's threads; cuDNN /
    determinism flags, as in training) with the device it selected and the job's thread count
    (torch's, which the rule's OMP_NUM_THREADS sets), before it loads the models."""
    script = load_script("predict_volume.py")
    events = record_torch_setup(monkeypatch, script)
    patient = three_files(tmp_path / "patient", affine_of())
    out = tmp_path / "out"
    args = cli_args(checkpoints, out, patient)
    assert_main_configures_torch(monkeypatch, script, ["predict_volume.py", *args], events)
    assert pd.read_csv(out / "volumes.csv", keep_default_na=False)["error"].tolist() == [""]


def test_cli_real_models_and_bad_patients_skipped(checkpoints, tmp_path):
    affine = affine_of()
    pre, flair, post, _ = blob_volume()
    good = three_files(tmp_path / "good", affine)
    shape = three_files(tmp_path / "shape", affine)
    save(post[:, :, :-1], shape / "case_post.nii.gz", affine)
    moved = three_files(tmp_path / "moved", affine)
    save(post, moved / "case_post.nii.gz", affine_of(spacing=(1, 1, 1)))
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti file at all" * 20)
    flat = save(flair[:, :, 0], tmp_path / "flat.nii.gz", affine)
    nan = flair.copy()
    nan[3, 4, 5] = np.nan
    nans = save(np.stack([pre, nan, post], axis=-1), tmp_path / "nans.nii.gz", affine)
    bad = [shape, moved, empty, corrupt, flat, nans]
    out = tmp_path / "out"
    result = cli(checkpoints, out, good, *bad)
    # The good patient is kept, the bad ones are in failures.csv, and the exit status is 1.
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    failures = pd.read_csv(out / "failures.csv")
    assert failures["input"].tolist() == [str(path) for path in bad]
    lines = result.stderr.split("6 of 7 patient(s) skipped:\n", 1)[1].strip().splitlines()
    expected = {
        shape: "case_post.nii.gz: shape (80, 72, 19) differs",
        moved: "case_post.nii.gz: affine differs",
        empty: "empty.nii.gz: empty file",
        corrupt: "corrupt.nii.gz: not a readable NIfTI file",
        flat: "flat.nii.gz: shape (80, 72)",
        nans: "nans.nii.gz: 1 NaN or infinite voxel(s)",
    }
    for line, (path, text) in zip(lines, expected.items(), strict=True):
        assert line.startswith(str(path)) and text in line, line
    table = pd.read_csv(out / "volumes.csv", keep_default_na=False)
    assert list(table["error"] != "") == [False] + [True] * 6
    assert sorted(p.name for p in (out / "patients").iterdir()) == ["good"]
    mask = nib.load(out / "patients" / "good" / "mask.nii.gz")
    assert mask.shape == SHAPE
    np.testing.assert_array_equal(mask.affine, nib.load(good / "case_flair.nii.gz").affine)
    slices = pd.read_csv(out / "patients" / "good" / "slices.csv")
    assert len(slices) == SHAPE[2] and slices["tumor_probability"].between(0, 1).all()
    # Every pixel called tumor: the mask is the whole input grid, back at its size exactly.
    assert np.asanyarray(mask.dataobj).all()
    assert int(table.iloc[0]["tumor_voxels"]) == np.prod(SHAPE)
    assert float(table.iloc[0]["tumor_ml"]) == pytest.approx(
        np.prod(SHAPE) * np.prod(SPACING) / 1000
    )
    assert (slices["decision"] == "tumor").all() and (slices["votes"] == 1).all()


def test_reader_errors_name_the_file(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    save(blob_volume()[1], folder / "scan.nii.gz", affine_of())
    with pytest.raises(InputError, match=r"scan\.nii\.gz: cannot tell the sequence"):
        read_input(folder, "axial")
    three = save(blob_volume()[1], tmp_path / "single.nii.gz", affine_of())
    with pytest.raises(InputError, match=r"single\.nii\.gz: shape \(80, 72, 20\); a one-file"):
        read_input(three, "axial")
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="none: no slices"):
        read_input(tmp_path / "none", "axial")


# --- the report's per-patient volume table ----------------------------------------------------


def test_report_volume_table_sums_slices_per_patient(tmp_path):
    from brainmri.reporting.volumes import patient_volumes, volume_rows

    patients = ["A", "A", "B", "B", "C"]
    true = [10, 20, 0, 5, 40]
    for arch, pred in (("unet", [12, 18, 3, 0, 44]), ("fpn", [0, 0, 0, 0, 0])):
        folder = tmp_path / "segmentation" / arch / "ensemble"
        folder.mkdir(parents=True)
        pd.DataFrame({"patient": patients, "pred_area": pred, "true_area": true}).to_csv(
            folder / "per_slice.csv", index=False
        )
    (tmp_path / "cascade").mkdir()
    pd.DataFrame(
        {"patient": patients, "cascade_pred_area": [12, 18, 0, 0, 44], "cascade_true_area": true}
    ).to_csv(tmp_path / "cascade" / "per_slice.csv", index=False)
    ensembles = {
        a: tmp_path / "segmentation" / a / "ensemble" / "per_slice.csv" for a in ("unet", "fpn")
    }
    table = patient_volumes(ensembles, tmp_path / "cascade" / "per_slice.csv")
    assert list(table.columns) == [
        "patient",
        "true",
        "unet fold ensemble",
        "fpn fold ensemble",
        "cascade",
    ]
    assert table["true"].tolist() == [30, 5, 40]
    assert table["unet fold ensemble"].tolist() == [30, 3, 44]
    assert table["cascade"].tolist() == [30, 0, 44]
    rows = volume_rows(table)
    last = rows.iloc[-1]
    assert last["patient"] == "Pearson r with true"
    assert last["unet fold ensemble"] == pytest.approx(np.corrcoef([30, 5, 40], [30, 3, 44])[0, 1])
    assert np.isnan(last["fpn fold ensemble"])  # a constant prediction has no correlation


def test_slice_folder_and_nifti_of_the_same_slices_agree(tmp_path):
    """Slices stacked into a NIfTI whose voxel axes are the display's (rows to posterior, columns
    to the patient's left, slices to superior) give the folder's per-slice results."""
    folder = tmp_path / "TCGA_CS_0002_20000101"
    folder.mkdir()
    pre, flair, post, _ = (np.transpose(a, (2, 1, 0)) for a in blob_volume())
    rgb = np.stack([pre, flair, post], axis=-1).clip(0, 255).astype(np.uint8)
    for k in range(len(rgb)):
        Image.fromarray(rgb[k]).save(folder / f"{folder.name}_{k}.tif")
    affine = np.array([[0, -1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nifti = save(np.transpose(rgb, (1, 2, 0, 3)), tmp_path / "same.nii.gz", affine)
    assert nib.aff2axcodes(affine) == ("P", "L", "S")
    _, table = run([reader(folder), reader(nifti)], tmp_path / "out")
    patients = tmp_path / "out" / "patients"
    pd.testing.assert_frame_equal(
        pd.read_csv(patients / folder.name / "slices.csv"),
        pd.read_csv(patients / "same" / "slices.csv"),
    )
    assert table.iloc[0]["tumor_voxels"] == table.iloc[1]["tumor_voxels"] > 0


@pytest.mark.realdata
def test_real_sample_patient_folder(tmp_path):
    """A real Kaggle patient folder (the sample in ../shared/data/kaggle-mini, when present):
    slices in number order at their own size, masks back at 256 x 256 under the TIFFs' names."""
    import zipfile

    from test_realdata_sample import SAMPLE

    if SAMPLE is None:
        pytest.skip("the real sample ../shared/data/kaggle-mini is absent")
    with zipfile.ZipFile(SAMPLE / "lgg-mri-segmentation.zip") as archive:
        names = [
            n for n in archive.namelist() if n.startswith("kaggle_3m/TCGA_") and n[-4:] == ".tif"
        ]
        patient = sorted(n.split("/")[1] for n in names)[0]
        members = [n for n in names if n.split("/")[1] == patient]
        archive.extractall(tmp_path, members)
    folder = tmp_path / "kaggle_3m" / patient
    count = sum(not n.endswith("_mask.tif") for n in members)
    volume = read_kaggle_folder(folder)
    assert volume.slice_numbers == list(range(1, count + 1))
    assert volume.slices.shape == (count, 256, 256, 3)
    first = np.asarray(Image.open(folder / f"{patient}_1.tif"))
    np.testing.assert_array_equal(volume.slices[0], first)
    assert volume.true_voxels > 0
    failures, table = run([reader(folder)], tmp_path / "out")
    assert failures == [] and table.iloc[0]["slices"] == count
    masks = sorted((tmp_path / "out" / "patients" / patient / "masks").iterdir())
    assert len(masks) == count and Image.open(masks[0]).size == (256, 256)
