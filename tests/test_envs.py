"""The conda environments (envs/*.yaml) that `snakemake --sdm conda` builds for the rules.

Conda channels are out of reach here, so the environments are checked statically: each file is
well-formed and pinned, every rule names one, and each environment lists exactly the third-party
packages that the scripts of its rules import (an AST scan of workflow_scripts/<name>.py that
follows imports of the brainmri package transitively), no more and no fewer.
"""

from __future__ import annotations

import ast
import copy
import re
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "rules"
SCRIPTS = REPO / "workflow_scripts"
PACKAGE = "brainmri"

# Import name -> conda-forge package name, where they differ beyond "_" -> "-".
IMPORT_TO_PACKAGE = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "torch": "pytorch",
    "cv2": "opencv",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "matplotlib": "matplotlib-base",
    "seaborn": "seaborn-base",
}
# Listed without being imported by a script, each for a reason.
NOT_IMPORTED_BUT_NEEDED = {
    "python": "the interpreter",
    "pip": "installs the pip: section",
    "six": "imported by kaggle 2.2.5, which does not declare it",
    "torchvision": "imported by timm and smp; pinned to the release that matches pytorch",
}
# Functions that only the Snakemake process calls (rules/common.smk), never a job: their
# imports do not count for the jobs' environments.
SNAKEMAKE_ONLY = {
    ("brainmri.config", name) for name in ("preflight", "schema_errors", "check_config")
}


# --- rules -> scripts -> imports --------------------------------------------------------------


def rule_blocks() -> dict[str, str]:
    """Rule name -> the text of its definition, for every rule in rules/*.smk."""
    blocks: dict[str, str] = {}
    for smk in sorted(RULES.glob("*.smk")):
        parts = re.split(r"^rule (\w+):\n", smk.read_text(), flags=re.MULTILINE)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            # A rule's body is indented; the first unindented line ends it.
            lines = []
            for line in body.splitlines():
                if line and not line[0].isspace():
                    break
                lines.append(line)
            blocks[name] = "\n".join(lines)
    return blocks


def rule_env_and_scripts() -> dict[str, tuple[str | None, list[str]]]:
    """Rule name -> (its conda: env file relative to rules/, the scripts its shell runs)."""
    result = {}
    for name, body in rule_blocks().items():
        env = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", body, flags=re.MULTILINE)
        scripts = re.findall(r"\$SCRIPTS/(\w+)\.py", body)
        result[name] = (env[1] if env else None, scripts)
    return result


def module_file(module: str) -> Path | None:
    """The source file of a brainmri module (None if there is none)."""
    parts = module.split(".")
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, current: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    nodes: list[ast.AST] = [tree]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.FunctionDef) and (current, node.name) in SNAKEMAKE_ONLY:
            continue
        nodes.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only inside the brainmri package
                anchor = (current or PACKAGE).split(".")
                anchor = anchor[: len(anchor) - node.level + (path.name == "__init__.py")]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            names.add(base)
            # `from brainmri import data` imports the submodule brainmri.data.
            names.update(f"{base}.{alias.name}" for alias in node.names if base == PACKAGE)
    return names


@cache
def third_party_imports(script: str) -> frozenset[str]:
    """Top-level third-party modules a script needs, following brainmri imports transitively."""
    found: set[str] = set()
    seen: set[str] = set()
    pending: list[tuple[Path, str | None]] = [(SCRIPTS / f"{script}.py", None)]
    while pending:
        path, current = pending.pop()
        for name in imports_of(path, current):
            top = name.split(".")[0]
            if top == PACKAGE:
                # brainmri.x.y also runs brainmri/__init__.py and brainmri/x/__init__.py.
                parts = name.split(".")
                for depth in range(1, len(parts) + 1):
                    module = ".".join(parts[:depth])
                    source = module_file(module)
                    if source is not None and module not in seen:
                        seen.add(module)
                        pending.append((source, module))
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                found.add(top)
    return frozenset(found)


def package_name(module: str) -> str:
    return IMPORT_TO_PACKAGE.get(module, module.replace("_", "-").lower())


# --- env files --------------------------------------------------------------------------------


def load_env(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def env_packages(env: dict) -> dict[str, str]:
    """Package name -> pinned version (conda `name=version[=build]`, pip `name==version`)."""
    packages = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                name, _, version = spec.partition("==")
                packages[name.strip().lower()] = version.strip()
        else:
            name, _, rest = dep.partition("=")
            packages[name.strip().lower()] = rest.split("=")[0].strip()
    return packages


def env_problems(env: dict, required: set[str]) -> list[str]:
    """What is wrong with one environment: its form, pins, and missing or stale packages."""
    problems = []
    if not isinstance(env, dict) or not isinstance(env.get("dependencies"), list):
        return ["no dependencies: list"]
    if "conda-forge" not in (env.get("channels") or []):
        problems.append("conda-forge is not among its channels")
    for dep in env["dependencies"]:
        specs = dep.get("pip", []) if isinstance(dep, dict) else [dep]
        pattern = (
            r"[A-Za-z0-9_.\-]+==\d[\w.]*"
            if isinstance(dep, dict)
            else (r"[A-Za-z0-9_.\-]+=\d[\w.]*(=[\w.*]+)?")
        )
        problems += [f"not pinned: {spec!r}" for spec in specs if not re.fullmatch(pattern, spec)]
    declared = set(env_packages(env))
    problems += [
        f"missing: {name} (imported by its scripts)" for name in sorted(required - declared)
    ]
    stale = declared - required - set(NOT_IMPORTED_BUT_NEEDED)
    problems += [
        f"stale: {name} (no script of this environment imports it)" for name in sorted(stale)
    ]
    return problems


def required_packages() -> dict[str, set[str]]:
    """Env file (relative to rules/) -> packages the scripts of its rules import."""
    required: dict[str, set[str]] = {}
    for env, scripts in rule_env_and_scripts().values():
        if env is None:
            continue
        for script in scripts:
            if (SCRIPTS / f"{script}.py").is_file():
                required.setdefault(env, set()).update(
                    map(package_name, third_party_imports(script))
                )
    return required


ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def test_every_rule_that_runs_a_script_names_an_existing_env():
    rules = rule_env_and_scripts()
    assert {"train_classifier", "fetch", "report"} <= set(rules)
    for name, (env, scripts) in rules.items():
        if not scripts:  # target rules such as `all` and `predict`
            continue
        assert env is not None, f"rule {name} has no conda: directive"
        assert (RULES / env).resolve().is_file(), f"rule {name}: {env} does not exist"
    used = {(RULES / env).resolve() for env, _ in rules.values() if env}
    assert used == {path.resolve() for path in ENV_FILES}, "an env file no rule uses"


def test_every_script_a_rule_runs_exists():
    missing = sorted(
        f"{rule}: workflow_scripts/{script}.py"
        for rule, (_, scripts) in rule_env_and_scripts().items()
        for script in scripts
        if not (SCRIPTS / f"{script}.py").is_file()
    )
    assert not missing, f"rules run scripts that do not exist: {missing}"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_lists_exactly_what_its_scripts_import(path):
    required = required_packages()[f"../envs/{path.name}"]
    assert required, f"no script found for {path.name}"
    assert env_problems(load_env(path), required) == []


def test_training_env_has_a_cuda_pytorch():
    deps = load_env(REPO / "envs" / "training.yaml")["dependencies"]
    pytorch = [d for d in deps if isinstance(d, str) and d.startswith("pytorch=")]
    assert len(pytorch) == 1 and pytorch[0].endswith("=cuda*"), pytorch


def test_import_scan_follows_the_package(tmp_path):
    # train.py imports brainmri modules that import torch, timm, pandas ...
    found = third_party_imports("train")
    assert {"torch", "timm", "numpy", "pandas"} <= found
    assert not {"os", "json", "brainmri", "__future__"} & found
    # fetch_dataset reaches the kaggle client only through brainmri.
    assert "kaggle" not in imports_of(SCRIPTS / "fetch_dataset.py")
    assert "kaggle" in third_party_imports("fetch_dataset")


def test_check_fails_when_a_package_is_removed_or_added():
    """The environment check on modified copies: it must notice each kind of mistake."""
    path = REPO / "envs" / "training.yaml"
    env = load_env(path)
    required = required_packages()["../envs/training.yaml"]
    assert env_problems(env, required) == []

    without = copy.deepcopy(env)
    without["dependencies"] = [d for d in without["dependencies"] if d != "timm=1.0.31"]
    assert len(without["dependencies"]) == len(env["dependencies"]) - 1
    assert env_problems(without, required) == ["missing: timm (imported by its scripts)"]

    # The same, on a copy of the file as text with the line deleted.
    text = "".join(
        line for line in path.read_text().splitlines(keepends=True) if "timm=" not in line
    )
    assert "missing: timm (imported by its scripts)" in env_problems(yaml.safe_load(text), required)

    stale = copy.deepcopy(env)
    stale["dependencies"].append("requests=2.32.5")
    assert env_problems(stale, required) == [
        "stale: requests (no script of this environment imports it)"
    ]

    unpinned = copy.deepcopy(env)
    unpinned["dependencies"] = [
        "numpy" if str(dep).startswith("numpy=") else dep for dep in env["dependencies"]
    ]
    assert "not pinned: 'numpy'" in env_problems(unpinned, required)

    no_channel = {**env, "channels": ["defaults"]}
    assert "conda-forge is not among its channels" in env_problems(no_channel, required)
