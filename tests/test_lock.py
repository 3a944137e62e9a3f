"""The locked environment: requirements.lock (made by `make lock`, installed by `make venv`)
agrees with requirements.txt and the conda env files (envs/*.yaml), and its hashes accept the
wheels this machine's local package index holds (pip --require-hashes takes them from there)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

LOCK = REPO / "requirements.lock"
# conda-forge name -> PyPI name, where they differ.
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib", "seaborn-base": "seaborn"}
NOT_LOCKED = {"python", "pip"}  # the interpreter, and the installer of an env's pip: section


def _lockfile():
    spec = importlib.util.spec_from_file_location("lockfile", REPO / "tools" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lockfile = _lockfile()


def locked() -> dict[str, str]:
    return lockfile.pins(LOCK.read_text())


def env_pins(path: Path) -> dict[str, str]:
    """PyPI name -> version of an env file (conda `name=version[=build]` and its pip: list)."""
    found = {}
    for item in yaml.safe_load(path.read_text())["dependencies"]:
        for spec in item["pip"] if isinstance(item, dict) else [item]:
            name, version = re.split(r"==?", spec.split("#")[0].strip())[:2]
            name = CONDA_TO_PYPI.get(name, name)
            if name not in NOT_LOCKED:
                found[lockfile.canonical(name)] = version
    return found


def test_every_locked_package_is_exact_and_hashed():
    text = LOCK.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert len(entries) == len(locked()) > 100
    for block in entries:
        assert re.match(r"[A-Za-z0-9_.\-]+==\S+ \\\n", block), block[:200]
        assert "--hash=sha256:" in block, block[:200]


def test_requirements_pins_are_the_locked_versions():
    """A pin changed in requirements.txt without `make lock` fails here."""
    required = lockfile.pins((REPO / "requirements.txt").read_text())
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").open()]
    assert len(required) == len([line for line in lines if line]), "every requirement is pinned"
    lock = locked()
    assert {name: lock.get(name) for name in required} == required


def drift(path: Path) -> dict[str, tuple[str, str | None]]:
    """Package -> (env version, locked version) where they differ (None: not in the lock)."""
    lock = locked()
    pins = env_pins(path)
    assert pins, path
    return {name: (v, lock.get(name)) for name, v in pins.items() if v != lock.get(name)}


@pytest.mark.parametrize("path", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_conda_env_versions_are_the_locked_ones(path):
    """Every package of an env file (also the pip: section) at exactly the locked version."""
    assert drift(path) == {}, f"{path.name}: (env, lock)"


def test_drift_is_detected(tmp_path):
    """The check above on a copy of envs/data.yaml with one version changed and one added."""
    text = (REPO / "envs" / "data.yaml").read_text()
    assert "  - pandas=3.1.1\n" in text and "      - kaggle==2.2.5" in text
    changed = tmp_path / "data.yaml"
    changed.write_text(
        text.replace("  - pandas=3.1.1\n", "  - pandas=3.0.0\n  - notlocked=1.0\n").replace(
            "kaggle==2.2.5", "kaggle==2.2.4"
        )
    )
    assert drift(changed) == {
        "pandas": ("3.0.0", "3.1.1"),
        "notlocked": ("1.0", None),
        "kaggle": ("2.2.4", "2.2.5"),
    }


def local_index_files() -> dict[str, str]:
    """Wheel file name -> sha256 on the local (file://) indexes pip is configured with."""
    options = lockfile.pip_indexes(Path(sys.executable))
    files = {}
    for option, location in zip(options[::2], options[1::2], strict=True):
        if option.endswith("index-url") and location.startswith("file://"):
            for page in Path(location.removeprefix("file://")).glob("*/index.html"):
                files.update(
                    re.findall(r">?([^/\"#>]+\.whl)#sha256=([0-9a-f]{64})", page.read_text())
                )
    return files


def test_the_lock_accepts_the_wheels_of_the_local_index():
    """pip takes torch & co from this machine's disk index: their hashes must be in the lock."""
    files = local_index_files()
    if not files:
        pytest.skip("no local package index configured for pip here")
    text = LOCK.read_text()
    wanted = {f"{name.replace('-', '_')}-{version}-": name for name, version in locked().items()}
    checked = []
    for wheel, sha in files.items():
        for prefix, name in wanted.items():
            if wheel.lower().startswith(prefix) and ("cp311" in wheel or "py3-none" in wheel):
                block = lockfile.entry(text, name)
                assert sha in block, f"{wheel}: its sha256 is not among {name}'s in the lock"
                checked.append(name)
    assert "torch" in checked and "torchvision" in checked, checked


def test_entry_is_one_package_with_its_hashes():
    block = lockfile.entry(LOCK.read_text(), "uv")
    assert block.startswith("uv==") and block.count("--hash=") >= 2 and "#" not in block


def test_make_venv_runs_the_locked_install_with_either_installer():
    """`make -n venv` (print only) for a fresh venv: the lock, not requirements.txt."""
    for installer, expected in (("uv", "--installer uv"), ("pip", "--installer pip")):
        result = subprocess.run(
            ["make", "-n", "venv", "VENV=/nonexistent/v", f"INSTALLER={installer}"],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "tools/lockfile.py install --venv /nonexistent/v" in result.stdout
        assert expected in result.stdout and "requirements.txt" not in result.stdout
