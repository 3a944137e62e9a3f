"""The quality benchmark (bench/quality.py): its patient-level plan, its training budget, its
variants file, and a tiny end-to-end run on a generated archive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench import quality, quality_cv
from brainmri.data.synthetic import write_btm_archive, write_lgg_archive
from brainmri.errors import InputError


def slice_rows(patients: int, slices: int = 5) -> pd.DataFrame:
    rows = []
    for p in range(patients):
        for s in range(slices):
            rows.append(
                {
                    "patient": f"TCGA_{'AB'[p % 2]}_{p:04d}",
                    "institution": "AB"[p % 2],
                    "id": f"{p}_{s}",
                    "slice_index": s,
                    "has_tumor": int(s in (1, 2)),
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("folds", [2, 4])
def test_every_patient_is_scored_once_by_a_model_that_never_saw_it(folds):
    rows = slice_rows(12)
    plan = quality_cv.cv_plan(rows, folds, 0.2, seed=3)
    tested = [p for fold in plan for p in fold.test]
    assert sorted(tested) == sorted(rows["patient"].unique())  # each patient once
    for fold in plan:
        train, val, test = set(fold.train), set(fold.val), set(fold.test)
        assert val and train and test
        # the model trains on train, its checkpoint is chosen on val: neither is scored
        assert not (train & test) and not (val & test) and not (train & val)
        assert train | val | test == set(rows["patient"])
    assert quality_cv.cv_plan(rows, folds, 0.2, seed=3) == plan  # reproducible
    table = quality_cv.plan_table(plan)
    assert (table[table["role"] == "test"].groupby("patient").size() == 1).all()


def test_plan_refuses_more_folds_than_patients():
    with pytest.raises(InputError, match="--folds 13"):
        quality_cv.cv_plan(slice_rows(12), 13, 0.2, seed=0)


def test_budget_stops_before_an_epoch_that_would_overrun():
    now = [0.0]
    started = []

    def batches(epoch):
        started.append(epoch)
        return iter(())

    train_batches = quality_cv.budgeted(batches, lambda: now[0], budget=24.0)
    for epoch, cost in enumerate([10.0, 10.0]):
        train_batches(epoch)
        now[0] += cost
    # 20 spent, 4 left: less than half of the last epoch (10): no third epoch
    with pytest.raises(quality_cv.BudgetSpent):
        train_batches(2)
    assert started == [0, 1]
    generous = quality_cv.budgeted(batches, lambda: now[0], budget=1e9)
    generous(0)  # the first epoch always runs


def test_flair_only_replaces_pre_and_post_contrast():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    out = quality_cv.flair_only(images)
    assert (out[..., 0] == images[..., 1]).all() and (out[..., 2] == images[..., 1]).all()
    assert (out[..., 1] == images[..., 1]).all() and not (out == images).all()


def write_variants(
    path: Path, variants: dict, reference: str = "recipe", ensembles: dict | None = None
) -> Path:
    spec = {"reference": reference, "variants": variants}
    if ensembles:
        spec["ensembles"] = ensembles
    path.write_text(yaml.safe_dump(spec))
    return path


def test_variants_file_errors_name_the_file_and_the_problem(tmp_path):
    bad = write_variants(tmp_path / "v.yaml", {"recipe": {"lossy": 1}})
    with pytest.raises(InputError, match=r"v\.yaml: variant recipe: unknown key\(s\) \['lossy'\]"):
        quality.load_variants(bad)
    bad = write_variants(tmp_path / "v.yaml", {"recipe": {}, "x": {"models_from": "nope"}})
    with pytest.raises(InputError, match="models_from 'nope' is no variant"):
        quality.load_variants(bad)
    bad = write_variants(
        tmp_path / "v.yaml", {"recipe": {}, "x": {"models_from": "recipe", "lr": 1}}
    )
    with pytest.raises(InputError, match=r"with models_from only .* may change, not \['lr'\]"):
        quality.load_variants(bad)
    with pytest.raises(InputError, match="reference 'other' is not a variant"):
        quality.load_variants(write_variants(tmp_path / "v.yaml", {"recipe": {}}, "other"))
    for budget in (0, -5, True, "long"):
        bad = write_variants(tmp_path / "v.yaml", {"recipe": {"budget": budget}})
        with pytest.raises(InputError, match=r"v\.yaml: variant recipe: budget must be a positive"):
            quality.load_variants(bad)
    path = write_variants(tmp_path / "v.yaml", {"recipe": {}})
    path.write_text(path.read_text() + "also_against: [plainest]\n")
    with pytest.raises(InputError, match="also_against: 'plainest' is not a variant"):
        quality.load_variants(path)


def test_the_shipped_variants_file_is_valid():
    spec, variants = quality.load_variants(quality.REPO / "bench" / "quality_variants.yaml")
    assert spec["reference"] in variants and "plain" in variants


def test_sampling_and_encoder_depth_variants_reach_the_models_settings():
    """The shipped area_weighted and encoder_depth_4 variants change exactly their key."""
    bench = shipped_bench("quality_variants.yaml")
    recipe = bench.settings("recipe")
    assert "encoder_depth" not in recipe and recipe["train_slices"] != "area_weighted"
    assert bench.settings("area_weighted") == {**recipe, "train_slices": "area_weighted"}
    assert bench.settings("encoder_depth_4") == {**recipe, "encoder_depth": 4}


def shipped_bench(variants_file: str, budget: float = 100.0) -> quality.Bench:
    """A Bench of a shipped variants file with its settings, without data."""
    import argparse

    bench = quality.Bench.__new__(quality.Bench)
    bench.args = argparse.Namespace(size=64, epochs=None, budget=budget)
    bench.spec, bench.variants = quality.load_variants(quality.REPO / "bench" / variants_file)
    bench.config = {}
    for name in bench.spec["base"]:
        bench.config = quality.deep_merge(bench.config, quality.read_yaml(quality.REPO / name))
    return bench


def test_precision_variants_differ_in_precision_and_budget_only():
    """bench/quality_precision.yaml: fp32 and bf16 models of one recipe; fp32's own budget
    (its 14 epochs take about twice bf16's CPU-seconds), inherited by its TTA variant."""
    bench = shipped_bench("quality_precision.yaml", budget=100.0)
    bf16, fp32 = bench.settings("bf16"), bench.settings("fp32")
    assert bf16["precision"] == "bf16" and fp32 == {**bf16, "precision": "fp32"}
    assert bf16["train_slices"] == "area_weighted" and bf16["epochs"] == 14
    assert bench.budget("bf16") == bench.budget("bf16_tta") == 100.0
    assert bench.budget("fp32") == bench.budget("fp32_tta") == 400.0
    assert bench.inference("fp32_tta")["tta"] and not bench.inference("fp32")["tta"]


def test_budgeted_fit_trains_with_the_plan_of_the_variants_settings(monkeypatch, tmp_path):
    """The loop gets the setup's plan (the variant's precision), not fit's default plan: a
    `precision: fp32` variant on a bf16 CPU trained in bf16 before."""
    from types import SimpleNamespace

    plan = object()
    seen = {}
    setup = SimpleNamespace(
        plan=plan, model=None, loss_fn=None, metric_fn=None, metric_name="accuracy",
        train_batches=None, val_batches=None,
    )  # fmt: skip
    monkeypatch.setattr(quality_cv, "build_training_setup", lambda *a, **k: setup)

    def fit(*args):
        seen["plan"] = args[-1]
        raise RuntimeError("recorded")

    monkeypatch.setattr(quality_cv, "fit", fit)
    settings = {"epochs": 1, "lr": 1e-3, "patience": None, "lr_schedule": "constant"}
    with pytest.raises(RuntimeError, match="recorded"):
        quality_cv.budgeted_fit(
            "classification", settings, tmp_path, None, None, 1.0, "cpu", 0, tmp_path
        )
    assert seen["plan"] is plan


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path):
    """Generated archives, 6 patients, 32 px, 2 folds, a budget of a second: every variant is
    scored on every patient (both conditions), classifiers at their array size and with the
    second dataset, a post-hoc ensemble, and the tables and CSVs are written."""
    source = tmp_path / "data"
    write_lgg_archive(source / "lgg-mri-segmentation.zip", 6, 6, seed=2)
    write_btm_archive(source / "brain-tumor-mri-dataset.zip", 2, seed=2)
    classifier = {"kind": "classifier", "backbone": "resnet10t", "epochs": 1, "batch_size": 8}
    variants = write_variants(
        tmp_path / "v.yaml",
        {
            "recipe": {"epochs": 1, "batch_size": 8, "tta": False},
            "plain": {"kind": "plain", "batch_size": 8},
            "no_post": {"models_from": "recipe", "postprocess": {"min_component_voxels": 0}},
            "cls": classifier,
            "cls_48": {**classifier, "array_size": 48},
            "cls_second": {**classifier, "second_dataset": True},
        },
        ensembles={
            "vote": {
                "classifiers": ["cls", "cls_48", "cls_second"],
                "segmentation": "recipe",
                "smooth_window": 3,
            },
        },
    )
    work = tmp_path / "work"
    argv = ["--data", str(source), "--work", str(work), "--variants", str(variants),
            "--size", "32", "--folds", "2", "--inner-val", "0.34", "--budget", "1",
            "--threads", "1", "--n-boot", "50"]  # fmt: skip
    quality.main(argv)
    patients = pd.read_csv(work / "patients.csv", keep_default_na=False)
    assert set(patients["variant"]) == {"recipe", "plain", "no_post"}
    for (_, condition), group in patients.groupby(["variant", "condition"]):
        assert condition in ("original", "flair_only") and group["patient"].nunique() == 6
    plan = pd.read_csv(work / "plan.csv")
    for _, row in patients[patients["condition"] == "original"].iterrows():
        own = plan[(plan["patient"] == row["patient"]) & (plan["fold"] == row["fold"])]
        assert list(own["role"]) == ["test"]  # scored by the fold that held it out
    report = (work / "quality.md").read_text()
    assert "| plain |" in report and "variant - recipe (original)" in report
    assert "seg:recipe" in report
    detectors = pd.read_csv(work / "detectors.csv")
    assert set(detectors["detector"]) == {
        "seg:recipe", "seg:plain", "seg:no_post", "cls", "cls_48", "cls_second", "vote"
    }  # fmt: skip
    slices = int((detectors["detector"] == "seg:recipe").sum())
    for _, group in detectors.groupby("detector"):  # one truth: the --size arrays' labels
        group = group.sort_values("id")
        assert list(group["label"]) == list(detectors[detectors["detector"] == "cls"]
                                            .sort_values("id")["label"])  # fmt: skip
        assert group["id"].nunique() == len(group) == slices
    assert "gate drops % of seg TP pixels" in report and "| vote |" in report
    assert "accuracy − best single classifier" in report
    for fold in (0, 1):
        models = work / "models"
        info = yaml.safe_load((models / "cls_second" / f"fold{fold}" / "info.json").read_text())
        assert info["second_dataset_slices"] == 4  # 2 glioma + 2 notumor, in training only
        for part in ("val", "test"):
            ids = pd.read_csv(models / "cls_second" / f"fold{fold}" / f"{part}.csv")["id"]
            assert not ids.str.startswith("btm_").any()
        assert yaml.safe_load((models / "cls_48" / f"fold{fold}" / "info.json").read_text())[
            "array_size"] == 48  # fmt: skip
    assert (work / "data48" / "lgg" / "images.npy").is_file()
    assert not (work / "models" / "no_post").exists()  # inference-only: no training
    mtime = (work / "models" / "recipe" / "fold0" / "model.pt").stat().st_mtime
    quality.main([*argv, "--report"])  # scoring again reuses the cache
    assert (work / "models" / "recipe" / "fold0" / "model.pt").stat().st_mtime == mtime


def test_auc_matches_scikit_learn_with_ties_and_quartiles_split_tumor_slices():
    from sklearn.metrics import roc_auc_score

    from bench.quality_score import _auc, area_quartiles

    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.4
    scores = rng.integers(0, 5, 60).astype(float)  # many ties, as mask areas have
    assert _auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert np.isnan(_auc(np.zeros(4, bool), np.arange(4.0)))
    quartile = area_quartiles(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0]))
    assert list(quartile) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 0]
