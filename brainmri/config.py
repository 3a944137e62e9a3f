"""Config helpers: per-model training settings and pre-flight checks beyond the JSON schema."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from brainmri.errors import ConfigError, close_matches, did_you_mean

# The training settings of each stage: what a model's training job receives (its params, its
# resume digest and its checkpoint). Evaluation settings (classification.threshold,
# segmentation.threshold, classification.ensemble) are not among them, so changing one reruns
# the evaluation jobs only.
_COMMON_KEYS = (
    "input_size",
    "epochs",
    "batch_size",
    "lr",
    "lr_schedule",
    "warmup_epochs",
    "weight_decay",
    "patience",
    "augment",
    # GPU throughput (docs/performance.md)
    "eval_batch_size",
    "val_every",
    "compile",
    "precision",
    "resident_share",
)
STAGE_KEYS = {
    "classification": ("pretrained", *_COMMON_KEYS),
    "segmentation": (
        *_COMMON_KEYS,
        "dice_smooth",
        "loss",
        "select_on",
        "modality_dropout",
        "slice_context",
        "train_slices",
        "empty_fraction",
    ),
}


# Keys renamed so that a name says which size it is: {section: (old key, new key)}.
RENAMED_KEYS = {
    "data": ("image_size", "array_size"),
    "classification": ("image_size", "input_size"),
    "segmentation": ("image_size", "input_size"),
}


def check_renamed_keys(config: dict[str, Any]) -> None:
    """A config that still uses a renamed key fails naming the new one (before the schema)."""
    for section, (old, new) in RENAMED_KEYS.items():
        block = config.get(section)
        if not isinstance(block, dict):
            continue
        models = block.get("backbones", []) + block.get("architectures", [])
        for where, entry in [(section, block)] + [
            (f"{section}.{e.get('name', '?')}", e) for e in models if isinstance(e, dict)
        ]:
            if old in entry:
                raise ConfigError(
                    f"{where}.{old}: renamed to {where}.{new} (data.array_size: side of the "
                    "stored arrays; <stage>.input_size: side of the model's input)"
                )


def _entries(config: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """The stage's model list as dicts with a ``name`` (backbones may be plain strings)."""
    key = "backbones" if stage == "classification" else "architectures"
    return [{"name": e} if isinstance(e, str) else dict(e) for e in config[stage][key]]


def model_names(config: dict[str, Any], stage: str) -> list[str]:
    """Names of the configured backbones (classification) or architectures (segmentation)."""
    names = [entry["name"] for entry in _entries(config, stage)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        key = "backbones" if stage == "classification" else "architectures"
        raise ConfigError(f"{stage}.{key}: duplicate names {duplicates}")
    return names


def training_settings(config: dict[str, Any], stage: str, name: str) -> dict[str, Any]:
    """The effective settings of one model: the stage's defaults, then the model's overrides.

    Classification: ``name`` is a backbone (a timm model name); ``settings["backbone"]`` too.
    Segmentation: ``name`` is an architecture entry's name; its ``arch`` and ``encoder`` are
    included, ``pretrained`` defaults to false.
    """
    section = config[stage]
    settings = {key: copy.deepcopy(section[key]) for key in STAGE_KEYS[stage] if key in section}
    matches = [entry for entry in _entries(config, stage) if entry["name"] == name]
    if not matches:
        raise ConfigError(f"{stage}: no model named {name!r}")
    if stage == "classification":
        settings["backbone"] = name
    else:
        settings["pretrained"] = False
    settings.update(copy.deepcopy(matches[0]))
    return settings


def check_schedule(settings: dict[str, Any], key: str) -> None:
    """warmup_epochs must leave epochs for the cosine part of lr_schedule warmup_cosine."""
    warmup = settings.get("warmup_epochs", 0)
    if settings.get("lr_schedule") == "warmup_cosine" and warmup >= settings["epochs"]:
        raise ConfigError(
            f"{key}.warmup_epochs: {warmup} warm-up epochs leave none of the "
            f"{settings['epochs']} epochs for the cosine schedule"
        )


def preflight(config: dict[str, Any]) -> None:
    """Cross-key checks that the schema cannot express; one ConfigError listing every problem."""
    problems = preflight_errors(config)
    if problems:
        raise ConfigError(error_report(problems))


def preflight_errors(config: dict[str, Any]) -> list[str]:
    """Every cross-key problem of a schema-valid config, one line each, naming the key."""
    from brainmri.models import check_classifier_config, check_segmenter_config

    problems: list[str] = []

    def collect(check, *args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        except ConfigError as error:
            problems.append(str(error))

    architectures = model_names(config, "segmentation")
    cascade_arch = config["cascade"]["architecture"]
    if cascade_arch not in architectures:
        problems.append(
            f"cascade.architecture: {cascade_arch!r} is not the name of one of "
            f"segmentation.architectures ({', '.join(architectures)})"
            + did_you_mean(cascade_arch, architectures)
        )
    for name in model_names(config, "classification"):
        settings = training_settings(config, "classification", name)
        collect(check_classifier_config, settings, key=f"classification.backbones.{name}")
        collect(check_schedule, settings, key=f"classification.backbones.{name}")
    for name in architectures:
        settings = training_settings(config, "segmentation", name)
        collect(check_segmenter_config, settings, key=f"segmentation.architectures.{name}")
        collect(check_schedule, settings, key=f"segmentation.architectures.{name}")
        final = config["segmentation"].get("final_model", {})
        epochs = final.get("epochs")
        warmup = settings.get("warmup_epochs", 0)
        if (
            final.get("enabled")
            and epochs is not None
            and settings.get("lr_schedule") == "warmup_cosine"
            and warmup >= epochs
        ):
            problems.append(
                f"segmentation.final_model.epochs: {epochs} epochs leave none for the cosine "
                f"schedule after {name}'s {warmup} warm-up epochs"
            )
    classification = config["classification"]
    voter_on = classification["segmentation_voter"]["enabled"]
    if classification["ensemble"] == "segmentation" and not voter_on:
        problems.append(
            "classification.ensemble: 'segmentation' needs "
            "classification.segmentation_voter.enabled: true (the voter decides alone)"
        )
    window = classification["smooth_window"]
    if window % 2 == 0:
        problems.append(f"classification.smooth_window: {window} must be odd (1 = off)")
    data = config["data"]
    if data["source"] == "local" and not data["local_dir"]:
        problems.append("data.local_dir: required when data.source is 'local'")
    if data["source"] == "synthetic":
        patients = data["synthetic"]["patients"]
        folds = config["split"]["folds"]
        if config["split"]["level"] == "patient":
            train_patients = patients - max(1, round(patients * config["split"]["test_fraction"]))
            if folds > train_patients:
                problems.append(
                    f"split.folds: {folds} folds need at least {folds} training patients, "
                    f"but data.synthetic.patients={patients} leaves {train_patients}"
                )
    return problems


# --- schema errors as one line each ----------------------------------------------------------


def error_report(problems: list[str]) -> str:
    """The text of a ConfigError: a count, then one line per problem."""
    count = f"{len(problems)} configuration error{'s' if len(problems) > 1 else ''}"
    return f"{count} (keys and defaults: config/schema.yaml):\n" + "\n".join(
        f"  {line}" for line in problems
    )


def _resolve(schema: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` (``#/$defs/...``)."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        target: Any = schema
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = {**{k: v for k, v in node.items() if k != "$ref"}, **target}
    return node


def _properties(schema: dict[str, Any], node: Any) -> dict[str, Any]:
    """The keys an object schema declares, through $ref, allOf/oneOf/anyOf and array items."""
    node = _resolve(schema, node)
    if not isinstance(node, dict):
        return {}
    found = dict(node.get("properties", {}))
    for combinator in ("allOf", "oneOf", "anyOf"):
        for branch in node.get(combinator, []):
            found.update(_properties(schema, branch))
    if "items" in node:
        found.update(_properties(schema, node["items"]))
    return found


def schema_keys(schema: dict[str, Any]) -> list[str]:
    """Every key the schema knows, as dotted paths (``split.folds``, ``data.extraction...``)."""
    paths: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for key, child in _properties(schema, node).items():
            path = f"{prefix}{key}"
            paths.append(path)
            walk(child, f"{path}.")

    walk(schema, "")
    return sorted(set(paths))


def _where(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error: Any, schema: dict[str, Any], keys: list[str]) -> list[str]:
    where = _where(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        allowed = _properties(schema, error.schema)
        lines = []
        for key in error.instance:
            if key in allowed:
                continue
            full = f"{where}.{key}" if where else str(key)
            hint = did_you_mean(key, allowed)
            if not hint:  # a key of another section? compare with every key's last part
                leaves = close_matches(key, {k.rsplit(".", 1)[-1] for k in keys}, n=2)
                paths = [k for k in keys if k.rsplit(".", 1)[-1] in leaves][:3]
                hint = f" (did you mean {' or '.join(map(repr, paths))}?)" if paths else ""
            lines.append(f"{full}: unknown key{hint}")
        return lines
    if kind in ("oneOf", "anyOf") and error.context:
        # The branch the value was meant for: the one that failed on more than its type.
        specific = [e for e in error.context if e.validator != "type"] or list(error.context)
        lines = []
        for sub in specific:
            lines.extend(_describe(sub, schema, keys))
        return lines
    prefix = f"{where}: " if where else ""
    if kind == "enum":
        choices = ", ".join(map(str, error.validator_value))
        hint = did_you_mean(str(error.instance), map(str, error.validator_value))
        return [f"{prefix}{_short(error.instance)} is not one of {choices}{hint}"]
    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return [f"{prefix}expected {expected}, got {_short(error.instance)}"]
    message = " ".join(error.message.split())
    return [f"{prefix}{message[:200]}"]


def schema_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every violation of the JSON schema, one line each, with did-you-mean suggestions."""
    from jsonschema import Draft202012Validator

    keys = schema_keys(schema)
    errors = sorted(
        Draft202012Validator(schema).iter_errors(config),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    lines: list[str] = []
    for error in errors:
        for line in _describe(error, schema, keys):
            if line not in lines:
                lines.append(line)
    return lines


def check_config(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Raise one ConfigError listing every schema violation of ``config`` (defaults not set)."""
    problems = schema_errors(config, schema)
    if problems:
        raise ConfigError(error_report(problems))
