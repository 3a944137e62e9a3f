"""The quality benchmark's slices as an nnU-Net v2 raw dataset, written with nibabel only (no
nnunetv2 needed), and read back.

One patient is one case: its slices, in ``slice_index`` order, stacked into a volume. Images:
``<case>_0000.nii.gz`` .. ``_0002`` = pre-contrast, FLAIR, post-contrast (the channels of the
benchmark's RGB arrays); labels: ``<case>.nii.gz``, 0 background / 1 tumor. The Kaggle TIFFs
carry no spacing, so every case gets the same nominal one, :data:`SPACING` (row, column and
slice spacing in mm: one pixel of the ``--size`` grid, one slice): all cases share it, so
nnU-Net's 2d configuration resamples nothing and predicts on the benchmark's own pixel grid.

Axes: the NIfTI data array is (column, row, slice) with the spacing on the affine's diagonal,
so SimpleITK (nnU-Net's default reader for .nii.gz) reads it as (slice, row, column), the
"z, y, x" order nnU-Net works in; its 2d configuration trains on the slices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.errors import InputError
from brainmri.tables import gather

SPACING = (1.0, 1.0, 1.0)  # row, column, slice (mm), nominal: see the module docstring
CHANNELS = {"0": "pre-contrast", "1": "FLAIR", "2": "post-contrast"}
LABELS = {"background": 0, "tumor": 1}
ENDING = ".nii.gz"


@dataclass(frozen=True)
class Case:
    """One patient as a volume: ``images`` (Z, H, W, 3) uint8, ``mask`` (Z, H, W) uint8 or
    None, and ``rows`` its manifest rows in slice order (``rows.index`` maps slice z back)."""

    name: str
    images: np.ndarray
    mask: np.ndarray | None
    rows: pd.DataFrame


def patient_cases(
    data: Path, rows: pd.DataFrame, patients: tuple[str, ...], masks: bool = True
) -> list[Case]:
    """The cases of ``patients`` (their slices of ``rows`` in slice order), arrays from
    ``data``; ``masks`` False leaves the labels out (cases to predict)."""
    cases = []
    for patient in patients:
        own = rows[rows["patient"] == patient].sort_values("slice_index", kind="stable")
        if own.empty:
            raise InputError(f"patient {patient}: no slices in the manifest")
        mask = gather(data, own, "masks").astype(np.uint8) if masks else None
        cases.append(Case(patient, gather(data, own), mask, own))
    return cases


def affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The NIfTI affine of (column, row, slice) data with ``spacing`` (row, column, slice)."""
    row, column, slice_ = spacing
    return np.diag([column, row, slice_, 1.0])


def _save(path: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """A (Z, H, W) volume as NIfTI data (W, H, Z)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), affine(spacing))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def write_case(
    images_dir: Path,
    labels_dir: Path | None,
    case: Case,
    spacing: tuple[float, float, float] = SPACING,
) -> list[Path]:
    """``<case>_000c.nii.gz`` per channel in ``images_dir`` (and ``<case>.nii.gz`` labels in
    ``labels_dir`` when given and the case has a mask); the files written."""
    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for channel in range(case.images.shape[-1]):
        path = images_dir / f"{case.name}_{channel:04d}{ENDING}"
        _save(path, case.images[..., channel], spacing)
        written.append(path)
    if labels_dir is not None and case.mask is not None:
        labels_dir.mkdir(parents=True, exist_ok=True)
        path = labels_dir / f"{case.name}{ENDING}"
        _save(path, case.mask, spacing)
        written.append(path)
    return written


def _load(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel as nib

    image = nib.load(str(path))
    column, row, slice_ = (float(z) for z in image.header.get_zooms()[:3])
    return np.asarray(image.dataobj).transpose(2, 1, 0), (row, column, slice_)


def read_case(images_dir: Path, labels_dir: Path | None, name: str, channels: int = 3):
    """``(images (Z, H, W, C), mask (Z, H, W) or None, spacing)`` of a case written by
    :func:`write_case`."""
    volumes, spacing = [], None
    for channel in range(channels):
        volume, spacing = _load(images_dir / f"{name}_{channel:04d}{ENDING}")
        volumes.append(volume)
    mask = None
    if labels_dir is not None and (labels_dir / f"{name}{ENDING}").is_file():
        mask, _ = _load(labels_dir / f"{name}{ENDING}")
    return np.stack(volumes, axis=-1), mask, spacing


def dataset_name(number: int, label: str) -> str:
    """nnU-Net's dataset folder name, ``Dataset<3-digit id>_<label>``."""
    if not 1 <= number <= 999:
        raise InputError(f"nnU-Net dataset id {number}: must be 1..999")
    return f"Dataset{number:03d}_{label}"


def write_dataset(
    raw: Path, name: str, cases: list[Case], spacing: tuple[float, float, float] = SPACING
) -> Path:
    """An nnU-Net raw dataset ``raw/<name>`` (imagesTr, labelsTr, dataset.json) of ``cases``,
    every one with its mask; its folder."""
    folder = raw / name
    for case in cases:
        if case.mask is None:
            raise InputError(f"{case.name}: a training case needs its mask")
        write_case(folder / "imagesTr", folder / "labelsTr", case, spacing)
    description = {
        "channel_names": CHANNELS,
        "labels": LABELS,
        "numTraining": len(cases),
        "file_ending": ENDING,
        "name": name,
        "description": "LGG patients of the quality benchmark (bench/nnunet_raw.py); nominal "
        f"spacing {list(spacing)} mm (row, column, slice)",
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=1) + "\n")
    return folder


def write_splits(preprocessed: Path, train: tuple[str, ...], val: tuple[str, ...]) -> Path:
    """nnU-Net's ``splits_final.json`` with one split (fold 0): train on ``train``, validate
    on ``val``, as the benchmark's inner validation patients."""
    if set(train) & set(val):
        raise InputError(f"splits: {sorted(set(train) & set(val))} in both train and val")
    preprocessed.mkdir(parents=True, exist_ok=True)
    path = preprocessed / "splits_final.json"
    path.write_text(json.dumps([{"train": list(train), "val": list(val)}], indent=1) + "\n")
    return path


def cases_in(folder: Path, names) -> set[str]:
    """Which of the case ``names`` have a file anywhere under ``folder`` (nnU-Net names a
    case's files ``<case>.*`` or ``<case>_*``: images, labels, preprocessed arrays)."""
    found = set()
    files = [path.name for path in folder.rglob("*") if path.is_file()]
    for name in names:
        if any(f.startswith((f"{name}.", f"{name}_")) for f in files):
            found.add(name)
    return found
