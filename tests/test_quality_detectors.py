"""The quality benchmark's detectors (bench/quality_detectors.py, issue 27): classifier data at
their own array size and with the second dataset, post-hoc ensembles, the cascade gate's cost."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from bench import quality, quality_cv
from bench import quality_detectors as detectors
from brainmri.data.synthetic import write_btm_archive, write_lgg_archive
from brainmri.errors import InputError
from brainmri.evaluation.decision import EnsembleRule, ensemble_decision


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source")
    write_lgg_archive(folder / "lgg-mri-segmentation.zip", 3, 4, seed=5)
    write_btm_archive(folder / "brain-tumor-mri-dataset.zip", 3, seed=5)
    return folder


def fake_bench(source, work, variants, patients=None):
    data = quality_cv.prepare_data(source, work, 32)
    rows = quality_cv.load_rows(data)
    if patients:
        keep = sorted(rows["patient"].unique())[:patients]
        rows = rows[rows["patient"].isin(keep)].reset_index(drop=True)
    args = SimpleNamespace(data=source, size=32)
    return SimpleNamespace(args=args, work=work, data=data, rows=rows, variants=variants)


def test_array_size_rows_are_the_benchmarks_slices_in_its_order(source, tmp_path):
    bench = fake_bench(source, tmp_path, {"c": {"kind": "classifier", "array_size": 48}}, 2)
    data, rows = detectors.classifier_data(bench, "c")
    assert data == tmp_path / "data48" and data != bench.data
    assert list(rows["id"]) == list(bench.rows["id"])
    assert list(rows.index) == list(bench.rows.index)
    assert quality_cv.gather(data, rows).shape[1:] == (48, 48, 3)
    assert detectors.classifier_data(bench, "c")[0] == data  # built once, then reused
    same = SimpleNamespace(**{**vars(bench), "variants": {"c": {"kind": "classifier"}}})
    assert detectors.classifier_data(same, "c") == (bench.data, bench.rows)


def test_array_size_rows_in_another_order_are_refused(source, tmp_path):
    bench = fake_bench(source, tmp_path, {})
    other = bench.rows.iloc[::-1].reset_index(drop=True)
    with pytest.raises(InputError, match=r"manifest\.csv: its LGG slices differ"):
        detectors.matching_rows(bench.rows, other, tmp_path / "manifest.csv")
    shorter = bench.rows.iloc[1:]
    with pytest.raises(InputError, match="differ from the benchmark"):
        detectors.matching_rows(bench.rows, shorter, tmp_path / "manifest.csv")


def test_input_size_follows_array_size_unless_set():
    assert detectors.classifier_settings({"array_size": 128}, {"input_size": 64}) == {
        "input_size": 128
    }
    kept = detectors.classifier_settings({"array_size": 128, "input_size": 96}, {"input_size": 96})
    assert kept == {"input_size": 96}
    assert detectors.classifier_settings({}, {"input_size": 64}) == {"input_size": 64}


def test_second_dataset_rows_join_the_training_rows_only(source, tmp_path):
    variants = {"c": {"kind": "classifier", "second_dataset": True}, "p": {"kind": "classifier"}}
    bench = fake_bench(source, tmp_path, variants)
    train = bench.rows[bench.rows["patient"] == bench.rows["patient"].iloc[0]]
    both = detectors.training_rows(bench, "c", bench.data, train)
    btm = both[both["source"] == "btm"]
    assert len(btm) == 6 and set(btm["btm_class"]) == {"glioma", "notumor"}
    assert list(both["id"].iloc[: len(train)]) == list(train["id"])
    assert list(both.index) == list(range(len(both)))  # one index: gather keeps the order
    images = quality_cv.loader(bench.data)(both, "images")
    assert images.shape == (len(both), 32, 32, 3)
    assert detectors.training_rows(bench, "p", bench.data, train) is train


def detector_slices() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two folds of one patient each, 4 slices: two classifiers and a seg detector."""
    rows = pd.DataFrame(
        {
            "id": ["a_1", "a_2", "a_3", "b_1", "b_2", "b_3"],
            "patient": ["a", "a", "a", "b", "b", "b"],
            "slice_index": [1, 2, 3, 1, 2, 3],
        }
    )
    p1 = [0.9, 0.2, 0.8, 0.1, 0.6, 0.4]
    p2 = [0.7, 0.4, 0.3, 0.2, 0.9, 0.45]
    areas = [30, 0, 12, 5, 40, 8]
    k = {0: 10, 1: 6}
    frames = []
    for name, score in (("c1", p1), ("c2", p2), ("seg:s", areas)):
        frames.append(
            pd.DataFrame(
                {
                    "detector": name,
                    "fold": [0, 0, 0, 1, 1, 1],
                    "id": rows["id"],
                    "patient": rows["patient"],
                    "label": [1, 0, 1, 0, 1, 1],
                    "score": score,
                    "min_pixels": [k[f] for f in (0, 0, 0, 1, 1, 1)] if name == "seg:s" else None,
                }
            )
        )
    slices = pd.concat(frames, ignore_index=True).sample(frac=1, random_state=1)  # any order
    return slices, rows


@pytest.mark.parametrize("method", ["majority", "soft", "segmentation"])
def test_ensemble_slices_decide_as_ensemble_decision(method):
    slices, rows = detector_slices()
    spec = {"classifiers": ["c1", "c2"], "segmentation": "s", "method": method, "smooth_window": 3}
    out = detectors.ensemble_slices(slices, rows, "e", spec, 0.5).set_index("id").loc[rows["id"]]
    probs = np.array([[0.9, 0.2, 0.8, 0.1, 0.6, 0.4], [0.7, 0.4, 0.3, 0.2, 0.9, 0.45]])
    areas = np.array([30, 0, 12, 5, 40, 8])
    for part, k in ((slice(0, 3), 10), (slice(3, 6), 6)):  # fold 0: patient a, fold 1: b
        rule = EnsembleRule(method, 0.5, k, 3)
        order = (rows["patient"].to_numpy()[part], rows["slice_index"].to_numpy()[part])
        expected = ensemble_decision(rule, probs[:, part], areas[part], order)
        assert list(out["pred"].iloc[part]) == list(expected.pred)
        assert np.allclose(out["score"].iloc[part], expected.probability)
        assert set(out["min_pixels"].iloc[part]) == {k}
    assert set(out["detector"]) == {"e"} and list(out["label"]) == [1, 0, 1, 0, 1, 1]
    # by hand, majority: votes a_1 3, a_2 0, a_3 2 (0.8, seg 12 >= 10), b_1 0, b_2 3, b_3 1
    # (seg 8 >= 6): 1 0 1 | 0 1 0; smoothing over 3 (ends keep their own on a tie): 1 1 1 | 0 0 0
    if method == "majority":
        assert list(out["pred"]) == [1, 1, 1, 0, 0, 0]
    if method == "segmentation":  # the voter alone (30 12 >= 10; 40 8 >= 6), then smoothing
        assert list(out["pred"]) == [1, 1, 1, 0, 1, 1]


def test_ensemble_without_voter_or_smoothing_is_the_plain_vote():
    slices, rows = detector_slices()
    out = detectors.ensemble_slices(slices, rows, "e", {"classifiers": ["c1", "c2"]}, 0.5)
    out = out.set_index("id").loc[rows["id"]]
    # 2 voters: ties (one vote each) go to the mean probability >= 0.5
    assert list(out["pred"]) == [1, 0, 1, 0, 1, 0]
    assert np.allclose(out["score"], [0.8, 0.3, 0.55, 0.15, 0.75, 0.425])
    assert out["min_pixels"].isna().all()


def test_gate_drop_share_by_hand():
    truth = np.zeros((3, 2, 2), bool)
    masks = np.zeros((3, 2, 2), bool)
    truth[0, 0] = True  # 2 tumor pixels
    masks[0, 0, 0] = masks[0, 1, 1] = True  # one true positive, one false positive
    truth[1] = True
    masks[1, :, 0] = masks[1, 0, 1] = True  # three true positives
    masks[2] = True  # no tumor: false positives only
    found, kept = detectors.gate_pixels(masks, truth, np.array([1, 0, 0]))
    assert list(found) == [1, 3, 0] and list(kept) == [1, 0, 0]
    share = detectors.gate_drop_share(found, kept, np.array(["a", "b", "b"]), n_boot=200)
    assert share["value"] == pytest.approx(75.0)  # 3 of the 4 true-positive pixels
    assert 0.0 <= share["ci_low"] <= share["value"] <= share["ci_high"] <= 100.0
    none = detectors.gate_drop_share(found, found, np.array(["a", "b", "b"]), n_boot=50)
    assert none["value"] == 0.0


def write(path, spec):
    path.write_text(yaml.safe_dump(spec))
    return path


def test_variants_file_checks_the_detector_keys(tmp_path):
    base = {"recipe": {}, "c": {"kind": "classifier"}}
    cases = [
        ({"recipe": {"array_size": 128}}, {}, r"variant recipe: \['array_size'\] only apply"),
        ({"c": {"kind": "classifier", "array_size": 8}}, {}, "array_size must be an integer"),
        ({"c": {"kind": "classifier", "second_dataset": "yes"}}, {}, "second_dataset must be"),
        ({}, {"e": {"classifiers": ["recipe"]}}, "ensemble e: 'recipe' is no classifier"),
        ({}, {"e": {"classifiers": ["c"], "segmentation": "c"}}, "'c' is no segmentation"),
        ({}, {"e": {"classifiers": ["c"], "method": "mean"}}, "method must be one of"),
        ({}, {"e": {"classifiers": ["c"], "smooth_window": 2}}, "smooth_window must be an odd"),
        ({}, {"e": {"classifiers": ["c"], "method": "segmentation"}}, "needs a segmentation"),
        ({}, {"e": {"classifiers": ["c"], "weights": 1}}, r"unknown key\(s\) \['weights'\]"),
        ({}, {"c": {"classifiers": ["c"]}}, "ensemble c: the name is also a variant's"),
        ({}, {"e": {"classifiers": []}}, "classifiers must be a non-empty list"),
    ]
    for variants, ensembles, message in cases:
        spec = {"reference": "recipe", "variants": {**base, **variants}, "ensembles": ensembles}
        with pytest.raises(InputError, match=message):
            quality.load_variants(write(tmp_path / "v.yaml", spec))
    good = {"e": {"classifiers": ["c"], "segmentation": "recipe", "smooth_window": 3}}
    spec, _ = quality.load_variants(
        write(tmp_path / "v.yaml", {"reference": "recipe", "variants": base, "ensembles": good})
    )
    assert spec["ensembles"] == good


def test_the_shipped_ensembles_vote_classifiers_of_the_file():
    spec, variants = quality.load_variants(quality.REPO / "bench" / "quality_variants.yaml")
    assert {"vote3", "vote3_seg", "vote3_seg_smooth3"} <= set(spec["ensembles"])
    assert variants["classifier_resnet18_256"]["array_size"] == 256
    assert variants["classifier_resnet18_second"]["second_dataset"] is True
