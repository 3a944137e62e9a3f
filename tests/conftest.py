"""Shared fixtures: a tiny synthetic dataset, preprocessed like the workflow's data stage.

``preprocessed_data`` (session scope) is what most tests of the later stages need: it writes
synthetic Kaggle-layout archives, extracts them safely, preprocesses both datasets at 64 px,
merges the manifest and makes patient-level splits, all in-process (a few seconds, once per
test session). Treat its files as read-only; copy them into ``tmp_path`` before modifying.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
# precision auto as on a CPU without native bf16: the fp32 plan, whose results the tests pin
# (the same on every machine); the bf16 plan is tested explicitly (tests/test_accelerator.py).
os.environ.setdefault("BRAINMRI_CPU_BF16", "0")


@dataclass(frozen=True)
class PreprocessedData:
    """Paths of a results-like folder ``results_dir`` produced by the data stage.

    Layout (as in docs/design.md, relative to ``results_dir``): ``raw/lgg-mri-segmentation/``,
    ``raw/brain-tumor-mri-dataset/``, ``data/lgg/{png/,images.npy,masks.npy,manifest.csv}``,
    ``data/btm/{png/,images.npy,manifest.csv}``, ``data/manifest.csv``,
    ``splits/{splits.csv,summary.tsv}``.
    """

    results_dir: Path
    data_dir: Path  # results_dir / "data" (manifest image_path / mask_path are relative to it)
    manifest: Path  # data/manifest.csv
    splits: Path  # splits/splits.csv
    summary: Path  # splits/summary.tsv
    lgg_images: Path  # data/lgg/images.npy, uint8 (N, 64, 64, 3)
    lgg_masks: Path  # data/lgg/masks.npy, uint8 (N, 64, 64), 0/1
    btm_images: Path  # data/btm/images.npy, uint8 (M, 64, 64, 3)
    array_size: int  # side of the stored arrays
    seed: int
    folds: int


# The fixture's settings: 8 patients (5 institutions) x 8-11 slices, 8 images per class of the
# second dataset; split: test 0.2 (2 patients), val 0.1 (1 patient), 3 folds, seed 42.
FIXTURE_SETTINGS = {
    "patients": 8,
    "slices_per_patient": 8,
    "images_per_class": 8,
    "array_size": 64,
    "seed": 42,
    "folds": 3,
}


def build_preprocessed_data(root: Path, **overrides: int) -> PreprocessedData:
    """Run the data stage on synthetic data into ``root`` (see FIXTURE_SETTINGS)."""
    from brainmri.data.archives import ExtractionLimits, extract_archive
    from brainmri.data.preprocess import merge_manifests, preprocess_btm, preprocess_lgg
    from brainmri.data.splits import make_splits, split_summary
    from brainmri.data.synthetic import write_btm_archive, write_lgg_archive
    from brainmri.io import write_csv

    settings = {**FIXTURE_SETTINGS, **overrides}
    size, seed = settings["array_size"], settings["seed"]
    raw, data = root / "raw", root / "data"
    lgg_zip, btm_zip = root / "archives" / "lgg.zip", root / "archives" / "btm.zip"
    write_lgg_archive(
        lgg_zip, settings["patients"], settings["slices_per_patient"], seed, size=size
    )
    write_btm_archive(btm_zip, settings["images_per_class"], seed)
    limits = ExtractionLimits()
    extract_archive(lgg_zip, raw / "lgg-mri-segmentation", limits)
    extract_archive(btm_zip, raw / "brain-tumor-mri-dataset", limits)
    lgg = preprocess_lgg(
        raw / "lgg-mri-segmentation",
        size,
        data / "lgg" / "png",
        data / "lgg" / "images.npy",
        data / "lgg" / "masks.npy",
        data / "lgg" / "manifest.csv",
    )
    preprocess_btm(
        raw / "brain-tumor-mri-dataset",
        size,
        data / "btm" / "png",
        data / "btm" / "images.npy",
        data / "btm" / "manifest.csv",
    )
    assert len(lgg) > 0
    manifest = merge_manifests([data / "lgg" / "manifest.csv", data / "btm" / "manifest.csv"])
    write_csv(data / "manifest.csv", manifest)
    splits = make_splits(manifest, folds=settings["folds"], seed=seed)
    write_csv(root / "splits" / "splits.csv", splits)
    write_csv(root / "splits" / "summary.tsv", split_summary(manifest, splits), sep="\t")
    return PreprocessedData(
        results_dir=root,
        data_dir=data,
        manifest=data / "manifest.csv",
        splits=root / "splits" / "splits.csv",
        summary=root / "splits" / "summary.tsv",
        lgg_images=data / "lgg" / "images.npy",
        lgg_masks=data / "lgg" / "masks.npy",
        btm_images=data / "btm" / "images.npy",
        array_size=size,
        seed=seed,
        folds=settings["folds"],
    )


@pytest.fixture(scope="session")
def preprocessed_data(tmp_path_factory: pytest.TempPathFactory) -> PreprocessedData:
    """A tiny preprocessed dataset in a results-like folder (session scope, read-only).

    Synthetic LGG: 8 patients (institutions CS, DU, EZ, FG, HT round-robin), 8-11 slices each
    (about 75 slices, roughly a third with tumor; patient 0 lacks pre-contrast, patient 3
    post-contrast); second dataset: 8 images per class -> 8 glioma + 8 notumor rows, one exact
    duplicate per class. Images 64 x 64. Patient-level splits, seed 42: 2 test patients,
    1 validation patient, 3 segmentation folds over the 6 training patients.

    Attributes (all ``pathlib.Path`` unless noted): ``results_dir``, ``data_dir``, ``manifest``
    (data/manifest.csv), ``splits`` (splits/splits.csv), ``summary`` (splits/summary.tsv),
    ``lgg_images`` (data/lgg/images.npy), ``lgg_masks`` (data/lgg/masks.npy), ``btm_images``
    (data/btm/images.npy), ``array_size`` (int, 64), ``seed`` (int), ``folds`` (int, 3).
    """
    return build_preprocessed_data(tmp_path_factory.mktemp("preprocessed"))


# The whole-workflow fixture lives in helpers.py (with the script and Snakemake runners).
# completed_demo (there too): a demo run that Snakemake holds for complete, for dry runs.
from helpers import completed_demo, workflow_run  # noqa: E402, F401

# `make test` runs the suite on one worker per core (pytest-xdist, `-n auto --dist loadgroup`).
# Each test module is one group, so that its module-scope fixtures are built once, on one
# worker; the modules that use a session's Snakemake run are one group per run (workflow_run:
# the tiny workflow, run once; completed_demo: a demo Snakemake holds for complete), and these
# groups are sent out first (the longest). xdist's own loadgroup cannot do this with pytest 9
# (it renames node ids through an attribute pytest 9 no longer reads), so the scheduler below
# groups the node ids itself, and the modules' groups are read from their source.
SESSION_RUNS = ("workflow_run", "completed_demo")  # a module using both: the first one's group
TESTS = Path(__file__).resolve().parent


@functools.cache  # the scheduler asks once per test
def session_run_of(module: str) -> int | None:
    """Which of SESSION_RUNS a test module's tests or fixtures take as an argument (its rank),
    or None: read from tests/<module>.py, so that the controller, which collects nothing, and
    every worker agree."""
    path = TESTS / f"{module}.py"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    signatures = re.findall(r"\bdef \w+\(([^)]*)\)", text)
    for rank, fixture in enumerate(SESSION_RUNS):
        if any(re.search(rf"\b{fixture}\b", arguments) for arguments in signatures):
            return rank
    return None


def group_of(nodeid: str) -> str:
    """A test's xdist group: its module, or the session run its module uses."""
    path = nodeid.split("::", 1)[0]
    rank = session_run_of(Path(path).stem)
    return path if rank is None else f"session-{SESSION_RUNS[rank]}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # On a worker xdist has set dist to "no" and loadgroup to whether the run distributes by
    # group: the session runs' modules first (the controller keeps this order, below).
    if getattr(config.option, "loadgroup", False):
        ranks = {path: session_run_of(path.stem) for path in {item.path for item in items}}
        last = len(SESSION_RUNS)
        items.sort(key=lambda item: last if ranks[item.path] is None else ranks[item.path])


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup`: whole groups (:func:`group_of`) to one worker, in collection order."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # the order of the collection: session runs first
    return ModuleGroups(config, log)


# The input fuzzer (tests/test_fuzz_inputs.py): a few dozen cases per reader in `make test`, the
# same cases on every run (derandomize); `--hypothesis-profile long` for a long search
# (FUZZ_EXAMPLES cases per reader, 4000 unless set; docs/reliability.md).
settings.register_profile("default", max_examples=25, derandomize=True, database=None)
settings.register_profile(
    "long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "4000")), database=None
)
settings.load_profile("default")
