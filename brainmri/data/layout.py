"""Where the raw files are: the LGG archive's layout, its duplicate tree, and the user's source.

The Kaggle LGG archive holds its whole ``kaggle_3m/`` folder twice: at ``kaggle_3m/`` and at
``lgg-mri-segmentation/kaggle_3m/``. One policy for that duplicate: **the primary tree is the
data; the other copies are only compared and reported.** The primary tree is the shallowest
folder that holds patient folders (``kaggle_3m/``; ties: the alphabetically first). Every slice
and mask is read from it alone: a file missing from it, or unreadable in it, is an error even
when a copy has a good one (the error says so). The copies are compared file by file (sha1)
and the differences are logged as warnings: files that differ, files only in a copy (ignored),
files missing from a copy.

Raw folders are extracted by ``fetch_dataset.py`` under ``results/.../raw``; it records the
user's source (the archive or folder named in the config, or the Kaggle dataset) in
:data:`SOURCE_FILE` inside the folder, so that errors name that source and the member inside
it instead of the extracted copy (:func:`naming_the_source`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from brainmri.errors import InputError

log = logging.getLogger(__name__)

LGG_SLICE = re.compile(r"^(?P<patient>TCGA_(?P<inst>[A-Z0-9]+)_[A-Z0-9]+_\d+)_(?P<n>\d+)\.tiff?$")
LGG_MASK = re.compile(r"^(?P<patient>TCGA_[A-Z0-9]+_[A-Z0-9]+_\d+)_(?P<n>\d+)_mask\.tiff?$")
SOURCE_FILE = ".brainmri-source"
_EXAMPLES = 3


# --- the user's source, for error messages ----------------------------------------------------


def record_source(raw_dir: Path, source: str) -> str:
    """Note inside an extracted folder where it came from (fetch_dataset.py); the file's name."""
    (Path(raw_dir) / SOURCE_FILE).write_text(source + "\n", encoding="utf-8")
    return SOURCE_FILE


def recorded_source(raw_dir: Path) -> str | None:
    path = Path(raw_dir) / SOURCE_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


@contextlib.contextmanager
def naming_the_source(raw_dir: Path) -> Iterator[None]:
    """Re-raise InputErrors about files of ``raw_dir`` as ``<source>: <member>: <problem>``.

    ``<source>`` is the archive or folder the user configured (see :func:`record_source`);
    without a record the message is left as it is.
    """
    try:
        yield
    except InputError as error:
        source = recorded_source(raw_dir)
        if source is None:
            raise
        message = str(error)
        message = message.replace(f"{raw_dir}{os.sep}", f"{source}: ")
        message = message.replace(f"{raw_dir}:", f"{source} (extracted to {raw_dir}):")
        raise type(error)(message) from None


# --- the LGG layout: one primary tree, compared copies ----------------------------------------


@dataclass(frozen=True)
class LggSlice:
    """One LGG slice of the primary tree, and the copies of its files in the other trees."""

    patient: str
    institution: str
    index: int
    image: Path
    mask: Path
    other_copies: tuple[tuple[Path, Path], ...] = ()  # (copy, the primary file it duplicates)


def _lgg_files(raw_dir: Path) -> dict[Path, dict[tuple[str, str, int], Path]]:
    """Tree (the folder holding patient folders) -> {(kind, patient, slice): path}."""
    trees: dict[Path, dict[tuple[str, str, int], Path]] = {}
    for path in sorted(raw_dir.rglob("*")):
        if not path.is_file():
            continue
        if match := LGG_MASK.match(path.name):
            kind = "mask"
        elif match := LGG_SLICE.match(path.name):
            kind = "image"
        else:
            continue
        files = trees.setdefault(path.parent.parent, {})
        files.setdefault((kind, match["patient"], int(match["n"])), path)
    return trees


def _relative(raw_dir: Path, path: Path) -> str:
    return f"{path.relative_to(raw_dir).as_posix()}/" if path != raw_dir else "./"


def _elsewhere(raw_dir: Path, key, copies: dict[Path, dict]) -> str:
    holders = [_relative(raw_dir, tree) for tree, files in copies.items() if key in files]
    if not holders:
        return ""
    return (
        f"; the duplicate tree {holders[0]} has it, but only the primary tree is read "
        "(duplicates are compared, never used: docs/data.md)"
    )


def find_lgg_slices(raw_dir: Path) -> list[LggSlice]:
    """Every (patient, slice) of the primary tree once, with its mask and its copies."""
    trees = _lgg_files(raw_dir)
    if not trees:
        raise InputError(
            f"{raw_dir}: no LGG slices found; expected kaggle_3m/TCGA_<inst>_<id>_<date>/"
            "TCGA_<inst>_<id>_<date>_<n>.tif with ..._<n>_mask.tif (is this the "
            "lgg-mri-segmentation archive?)"
        )
    primary = min(trees, key=lambda tree: (len(tree.parts), str(tree)))
    data = trees[primary]
    copies = {tree: files for tree, files in trees.items() if tree != primary}
    slices = []
    for patient, index in sorted({(patient, index) for _, patient, index in data}):
        image, mask = data.get(("image", patient, index)), data.get(("mask", patient, index))
        if mask is None:
            key = ("mask", patient, index)
            raise InputError(
                f"{image}: image without its mask ({patient}_{index}_mask.tif)"
                + _elsewhere(raw_dir, key, copies)
            )
        if image is None:
            key = ("image", patient, index)
            raise InputError(f"{mask}: mask without its image" + _elsewhere(raw_dir, key, copies))
        others = tuple(
            (files[(kind, patient, index)], chosen)
            for files in copies.values()
            for kind, chosen in (("image", image), ("mask", mask))
            if (kind, patient, index) in files
        )
        inst = LGG_SLICE.match(image.name)["inst"]
        slices.append(LggSlice(patient, inst, index, image, mask, others))
    _report_trees(raw_dir, primary, data, copies)
    return slices


def _report_trees(raw_dir: Path, primary: Path, data: dict, copies: dict[Path, dict]) -> None:
    """Log which tree is read, and what the copies hold that it lacks, or lack."""
    log.info("LGG: reading the primary tree %s", _relative(raw_dir, primary))
    for tree, files in copies.items():
        name = _relative(raw_dir, tree)
        only_there = sorted(files[key].name for key in files.keys() - data.keys())
        missing = sorted(data[key].name for key in data.keys() - files.keys())
        if only_there:
            log.warning(
                "LGG: %d files only in the duplicate tree %s are ignored (e.g. %s)",
                len(only_there),
                name,
                ", ".join(only_there[:_EXAMPLES]),
            )
        if missing:
            log.warning(
                "LGG: %d files of the primary tree are missing from the duplicate %s (e.g. %s)",
                len(missing),
                name,
                ", ".join(missing[:_EXAMPLES]),
            )
        log.info(
            "LGG: duplicate tree %s compared, not used (%d files in common)",
            name,
            len(files.keys() & data.keys()),
        )


def file_sha1(path: Path) -> str:
    """sha1 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha1").hexdigest()


def compare_copies(item: LggSlice) -> int:
    """Warn for each copy of the slice's files that differs from the primary; their number."""
    differing = 0
    for other, chosen in item.other_copies:
        if file_sha1(other) != file_sha1(chosen):
            differing += 1
            log.warning("%s differs from %s (sha1); using %s", other, chosen, chosen)
    return differing
