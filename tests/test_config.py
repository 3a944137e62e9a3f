"""Config errors: every schema violation at once, one line each, with did-you-mean hints."""

from __future__ import annotations

import copy

import pytest
import yaml
from helpers import REPO

from brainmri.config import (
    check_config,
    close_matches,
    did_you_mean,
    preflight_errors,
    schema_errors,
    schema_keys,
)
from brainmri.errors import ConfigError

SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def demo(**changes) -> dict:
    config = copy.deepcopy(DEMO)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def test_the_demo_config_is_valid():
    assert schema_errors(demo(), SCHEMA) == []
    check_config(demo(), SCHEMA)


def test_did_you_mean():
    assert close_matches("resnt50", ["resnet50", "vgg16", "resnet18"])[0] == "resnet50"
    assert did_you_mean("Folds", ["folds", "level"]) == " (did you mean 'folds'?)"
    assert did_you_mean("zzz", ["folds", "level"]) == ""


def test_schema_keys_cover_nested_sections_and_model_entries():
    keys = schema_keys(SCHEMA)
    assert {"split.folds", "data.extraction.max_total_bytes", "segmentation.threshold"} <= set(keys)
    assert "classification.backbones.batch_size" in keys  # from the per-model overrides


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"split__fold": 3}, "split.fold: unknown key (did you mean 'folds'?)"),
        (
            {"trheshold": 0.5},
            "trheshold: unknown key (did you mean 'classification.threshold' or "
            "'segmentation.threshold'?)",
        ),
        (
            {"classification__dice_smooth": 1.0},
            "classification.dice_smooth: unknown key (did you mean 'segmentation.dice_smooth'?)",
        ),
        ({"classification__epochs": "ten"}, "classification.epochs: expected integer, got 'ten'"),
        (
            {"split__level": "patients"},
            "split.level: 'patients' is not one of patient, slice (did you mean 'patient'?)",
        ),
        (
            {"classification__backbones": ["resnet18", {"name": "resnet34", "batchsize": 4}]},
            "classification.backbones[1].batchsize: unknown key (did you mean 'batch_size'",
        ),
        (
            {"segmentation__architectures": [{"name": "u", "arch": "Unte", "encoder": "resnet18"}]},
            "segmentation.architectures[0].arch: 'Unte' is not one of",
        ),
    ],
)
def test_each_schema_error_is_one_line_naming_the_key(changes, line):
    errors = schema_errors(demo(**changes), SCHEMA)
    assert len(errors) == 1, errors
    assert errors[0].startswith(line), errors
    assert "\n" not in errors[0] and len(errors[0]) < 200


def test_all_errors_are_reported_at_once():
    config = demo(split__fold=3, split__level="patients", classification__epochs="ten")
    with pytest.raises(ConfigError) as caught:
        check_config(config, SCHEMA)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("3 configuration errors")
    assert len(lines) == 4
    assert "schema" not in " ".join(lines[1:]).lower()


def test_preflight_lists_every_problem_with_suggestions():
    config = check_defaults(
        demo(
            classification__backbones=["resnt50", "inceptionv3"],
            cascade__architecture="unte",
        )
    )
    problems = preflight_errors(config)
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "timm has no model named 'resnt50' (did you mean 'resnet50'" in text
    assert "timm has no model named 'inceptionv3' (did you mean 'inception_v3'" in text
    assert "cascade.architecture: 'unte'" in text and "(did you mean 'unet'?)" in text


def test_unknown_smp_encoder_gets_a_suggestion():
    config = check_defaults(
        demo(segmentation__architectures=[{"name": "unet", "arch": "Unet", "encoder": "resnt18"}])
    )
    config["cascade"]["architecture"] = "unet"
    (problem,) = preflight_errors(config)
    assert "has no encoder 'resnt18' (did you mean 'resnet18'" in problem


def check_defaults(config: dict) -> dict:
    """The config with the schema's defaults filled in, as rules/common.smk leaves it."""
    from snakemake.utils import validate

    validate(config, str(REPO / "config" / "schema.yaml"), set_default=True)
    return config


def test_ensemble_segmentation_needs_the_voter_one_line_naming_the_keys():
    voter_off = check_defaults(
        demo(
            classification__ensemble="segmentation",
            classification__segmentation_voter={"enabled": False},
        )
    )
    (problem,) = preflight_errors(voter_off)
    assert problem.startswith("classification.ensemble: 'segmentation' needs")
    assert "classification.segmentation_voter.enabled: true" in problem and "\n" not in problem
    voter_on = check_defaults(
        demo(
            classification__ensemble="segmentation",
            classification__segmentation_voter={"enabled": True},
        )
    )
    assert preflight_errors(voter_on) == []
    assert schema_errors(demo(classification__ensemble="segmentation"), SCHEMA) == []
