"""The files of a folder of new images for ``predict``: which are predicted, where their outputs
go, their ``_mask`` beside them, and (series) their patient and slice number.

- Every file under the folder (recursively, hidden ones left out) is predicted, except the
  masks: a file whose stem ends with ``_mask`` (the Kaggle layout's ``<slice>_mask.tif``).
- Outputs mirror the input's relative paths with a ``.png`` suffix (``a/scan_1.tif`` ->
  ``a/scan_1.png``); where two inputs would meet there (``scan_1.png`` and ``scan_1.tif``),
  both keep their full name (``scan_1.tif.png``).
- ``<stem>_mask.<ext>`` beside an image (any image suffix, the first in name order) is its
  true mask (pixels > 127).
- A series: ``<patient>_<n>.<ext>`` in one folder are that patient's slices in the order of n.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.data.preprocess import IMAGE_SUFFIXES, open_image, to_uint8_gray
from brainmri.errors import InputError

MASK_SUFFIX = "_mask"
SERIES_NAME = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)$")


def is_mask(path: Path) -> bool:
    return path.stem.lower().endswith(MASK_SUFFIX)


def find_images(folder: Path) -> list[Path]:
    """The files to predict under ``folder``, in name order (masks and hidden files left out)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not is_mask(p)
    )


def output_names(files: list[str]) -> dict[str, str]:
    """Relative input path -> relative output path (``.png``), without collisions."""
    plain = {name: Path(name).with_suffix(".png").as_posix() for name in files}
    counts = Counter(plain.values())
    names = {name: out if counts[out] == 1 else f"{name}.png" for name, out in plain.items()}
    taken = Counter(names.values())
    clash = [name for name, out in names.items() if taken[out] > 1]
    if clash:
        raise InputError(f"{clash[0]}: its output name {names[clash[0]]} is taken twice")
    return names


def mask_beside(path: Path) -> Path | None:
    """``<stem>_mask.<ext>`` beside ``path``, if there is one."""
    found = sorted(
        p
        for p in path.parent.glob(f"{glob_escape(path.stem)}{MASK_SUFFIX}.*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    return found[0] if found else None


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def read_truth(path: Path) -> np.ndarray | None:
    """The true mask beside ``path`` (bool, its own size), None if there is none; an unreadable
    mask raises InputError naming it."""
    mask = mask_beside(path)
    if mask is None:
        return None
    return to_uint8_gray(open_image(mask)) > 127


def series_rows(files: list[str]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(patient, slice_index) of each relative path (patient: its folder and name prefix), and
    the files whose names do not say it, with the reason (their rows are empty)."""
    rows, bad = [], []
    for name in files:
        path = Path(name)
        match = SERIES_NAME.match(path.stem)
        if match is None:
            bad.append((name, "not named <patient>_<n>.<ext>, as images of a series must be"))
            rows.append({"patient": "", "slice_index": -1})
            continue
        patient = (path.parent / match["patient"]).as_posix()
        rows.append({"patient": patient, "slice_index": int(match["n"])})
    frame = pd.DataFrame(rows, columns=["patient", "slice_index"])
    ok = frame["slice_index"] >= 0
    duplicated = frame[ok].duplicated(["patient", "slice_index"], keep=False)
    for position in frame[ok][duplicated].index:
        bad.append((files[position], "a second image of the same slice of its series"))
    return frame, bad
