"""The fold ensemble of the quality benchmark (bench/quality_members.py): the members' plan
inside an outer fold, the averaging (the workflow's fold-ensemble function), the out-of-fold
validation predictions, the variants' checks and a tiny end-to-end run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from test_quality_bench import slice_rows, write_variants

from bench import quality, quality_cv, quality_members
from brainmri.data.synthetic import write_lgg_archive
from brainmri.errors import InputError
from brainmri.evaluation.masks import mean_probabilities


@pytest.mark.parametrize("members", [2, 3])
def test_members_split_the_outer_training_patients_and_never_see_the_test_patients(members):
    rows = slice_rows(15)
    for fold in quality_cv.cv_plan(rows, 3, 0.2, seed=5):
        plan = quality_members.members_plan(rows, fold, members, seed=5)
        training = set(fold.train) | set(fold.val)
        assert [m.number for m in plan] == list(range(members))
        vals = [set(m.val) for m in plan]
        for m, val in zip(plan, vals, strict=True):
            assert not (set(m.train) | val) & set(fold.test)  # no outer test patient
            assert set(m.train) | val == training and not set(m.train) & val
        assert set().union(*vals) == training  # the members' val sets cover the fold
        assert sum(len(v) for v in vals) == len(training)  # and are disjoint
        assert quality_members.members_plan(rows, fold, members, seed=5) == plan


def test_members_plan_refuses_more_members_than_training_patients():
    rows = slice_rows(6)
    fold = quality_cv.cv_plan(rows, 2, 0.34, seed=0)[0]
    with pytest.raises(InputError, match="members 4: outer fold 0 has 3 training patients"):
        quality_members.members_plan(rows, fold, 4, seed=0)


def fake_bench(rows: pd.DataFrame, stored: dict[str, np.ndarray]):
    """A bench whose members' probabilities are ``stored[name-part]``."""
    variants = quality_members.expand({"ens": {"members": 2}})
    bench = SimpleNamespace(variants=variants, rows=rows, args=SimpleNamespace(seed=1))
    bench.probabilities = lambda name, fold, part: stored[f"{name}-{part}"]
    return bench


def test_the_ensemble_is_the_workflows_fold_ensemble_and_val_is_out_of_fold():
    rows = slice_rows(8, slices=3)
    fold = quality_cv.cv_plan(rows, 2, 0.25, seed=1)[0]
    bench = fake_bench(rows, {})
    test = quality_cv.of(rows, fold.test)
    a = np.array([[[0, 1], [254, 255]]] * len(test), dtype=np.uint8)
    b = np.array([[[1, 2], [255, 255]]] * len(test), dtype=np.uint8)
    plan = quality_members.members_plan(rows, fold, 2, seed=1)
    val = {m.number: quality_cv.of(rows, m.val) for m in plan}
    stored = {"ens/m0-test": a, "ens/m1-test": b}
    for m, own in val.items():  # each member's val probabilities: its number + 10
        stored[f"ens/m{m}-val"] = np.full((len(own), 2, 2), m + 10, dtype=np.uint8)
    bench.probabilities = lambda name, fold, part: stored[f"{name}-{part}"]
    mean = quality_members.ensemble_probabilities(bench, "ens", fold, "test")
    assert mean.dtype == np.uint8
    assert np.array_equal(mean, mean_probabilities([a, b]))  # the workflow's function
    assert mean[0].tolist() == [[0, 2], [254, 255]]  # (0+1)/2, (1+2)/2, (254+255)/2: half even
    oof = quality_members.ensemble_probabilities(bench, "ens", fold, "val")
    training = quality_cv.of(rows, quality_members.val_patients(bench, "ens", fold))
    assert len(oof) == len(training) == len(quality_cv.of(rows, fold.train + fold.val))
    for m, own in val.items():  # every training slice by the member that held it out
        assert (oof[training.index.get_indexer(own.index)] == m + 10).all()


def test_members_variants_are_checked_and_expanded(tmp_path):
    bad = write_variants(tmp_path / "v.yaml", {"recipe": {"members": 1}})
    with pytest.raises(InputError, match=r"v\.yaml: variant recipe: members must be an integer"):
        quality.load_variants(bad)
    bad = write_variants(tmp_path / "v.yaml", {"recipe": {}, "c": {"kind": "plain", "members": 2}})
    with pytest.raises(InputError, match="variant c: members needs kind recipe, not plain"):
        quality.load_variants(bad)
    bad = write_variants(tmp_path / "v.yaml", {"recipe": {}, "t": {"models_from": "recipe",
                                                                   "members": 2}})  # fmt: skip
    with pytest.raises(InputError, match=r"with models_from only .* not \['members'\]"):
        quality.load_variants(bad)
    _, variants = quality.load_variants(quality.REPO / "bench" / "quality_variants.yaml")
    assert variants["recipe_ensemble"]["members"] == 3
    expanded = list(quality_members.expand(variants))
    at = expanded.index("recipe_ensemble_tta")
    assert expanded[at : at + 4] == ["recipe_ensemble_tta"] + [
        f"recipe_ensemble_tta/m{m}" for m in range(3)
    ]
    member = quality_members.expand(variants)["recipe_ensemble_tta/m1"]
    assert member["models_from"] == "recipe_ensemble" and member["tta"] and member["member"] == 1


@pytest.mark.slow
def test_tiny_members_run(tmp_path):
    """Generated archive, 6 patients, 2 outer folds of 2 members, a budget of a second: the
    ensemble and each member are scored on every patient, the table against the best member is
    written, and the cache is reused."""
    source = tmp_path / "data"
    write_lgg_archive(source / "lgg-mri-segmentation.zip", 6, 6, seed=2)
    variants = write_variants(
        tmp_path / "v.yaml",
        {
            "recipe": {"epochs": 1, "batch_size": 8, "tta": False},
            "ens": {"epochs": 1, "batch_size": 8, "tta": False, "members": 2},
            "ens_post": {"models_from": "ens", "postprocess": {"min_component_voxels": 0}},
        },
    )
    work = tmp_path / "work"
    argv = ["--data", str(source), "--work", str(work), "--variants", str(variants),
            "--size", "32", "--folds", "2", "--inner-val", "0.34", "--budget", "1",
            "--threads", "1", "--n-boot", "50"]  # fmt: skip
    quality.main([*argv, "--only", "ens/m0", "--fold", "0"])  # one member of one fold
    assert (work / "models" / "ens" / "fold0" / "m0" / "model.pt").is_file()
    assert not (work / "models" / "ens" / "fold0" / "m1").exists()
    assert not (work / "models" / "ens" / "fold0" / "info.json").exists()  # ensemble not done
    quality.main(argv)
    patients = pd.read_csv(work / "patients.csv", keep_default_na=False)
    names = {"ens", "ens/m0", "ens/m1", "ens_post", "ens_post/m0", "ens_post/m1"}
    assert set(patients["variant"]) == {"recipe"} | names
    for _, group in patients.groupby(["variant", "condition"]):
        assert group["patient"].nunique() == 6
    members = pd.read_csv(work / "members2_plan.csv")
    plan = pd.read_csv(work / "plan.csv")
    for fold in (0, 1):
        test = set(plan[(plan["fold"] == fold) & (plan["role"] == "test")]["patient"])
        own = members[members["fold"] == fold]
        assert not test & set(own["patient"])
        assert sorted(own[own["role"] == "val"]["patient"]) == sorted(set(own["patient"]))
        probs = work / "probs" / "ens-tta0"
        ensemble = np.load(probs / f"fold{fold}-test.npy")
        each = [np.load(probs / f"fold{fold}-m{m}-test.npy") for m in (0, 1)]
        assert np.array_equal(ensemble, mean_probabilities(each))
    report = (work / "quality.md").read_text()
    assert "| fold ensemble − best member |" in report
    assert "| ens | original | ens/m" in report and "| ens_post | flair_only | ens_post/m" in report
    detectors = pd.read_csv(work / "detectors.csv")
    assert {"seg:ens", "seg:ens/m0", "seg:ens/m1"} <= set(detectors["detector"])
    assert not (work / "models" / "ens_post").exists()  # inference-only: no training
    mtime = (work / "models" / "ens" / "fold1" / "m1" / "model.pt").stat().st_mtime
    quality.main([*argv, "--report"])
    assert (work / "models" / "ens" / "fold1" / "m1" / "model.pt").stat().st_mtime == mtime
