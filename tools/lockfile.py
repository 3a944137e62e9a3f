"""The locked environment: `make venv` installs requirements.lock (exact versions and sha256
hashes of every package, made by `make lock` with `uv pip compile --generate-hashes`).

  python3 tools/lockfile.py install --venv .venv [--installer uv|pip]

uv (the default) installs the lock in seconds where its cache is warm; it is taken from PATH or,
when absent, installed into the venv by pip from the lock's own hashed `uv` entry. `--installer
pip` is the plain-pip path (`pip install --require-hashes --no-deps -r requirements.lock`).
Both install exactly the locked files (--no-deps: the lock is complete; a hash that does not
match stops the install). uv is given the package indexes pip is configured with (`pip config`:
index-url, extra-index-url, find-links), first-match, so that wheels that lie on a local index
(e.g. torch's CUDA build) are taken from there instead of being downloaded again.

Standard library only: it runs with the interpreter that creates the venv.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==(\S+)", re.MULTILINE)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """Package (canonical name) -> exact version, of a requirements or lock file's text."""
    return {canonical(m[1]): m[2] for m in ENTRY.finditer(text)}


def entry(text: str, name: str) -> str:
    """One package's whole entry (the `name==version` line and its hash lines) in a lock."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        match = ENTRY.match(line)
        if match and canonical(match[1]) == canonical(name):
            block = [line]
            for follow in lines[start + 1 :]:
                if not follow.startswith("    --hash="):
                    break
                block.append(follow)
            return "\n".join(block) + "\n"
    raise SystemExit(f"error: {LOCK.name} has no entry for {name!r}")


def pip_indexes(python: Path) -> list[str]:
    """uv options for the indexes pip is configured with here (pip.conf, PIP_* variables)."""
    listed = subprocess.run(
        [str(python), "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    pairs: list[list[str]] = []
    flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url"}
    flags["find-links"] = "--find-links"
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = flags.get(key.rsplit(".", 1)[-1])
        for location in value.strip("'\"").split() if option else []:
            local = "://" not in location or location.startswith("file://")
            if local and not Path(location.removeprefix("file://")).exists():
                continue  # uv stops on a local index that is not there; pip ignores it
            if [option, location] not in pairs:
                pairs.append([option, location])
    return [part for pair in pairs for part in pair]


def run(command: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def install(venv: Path, installer: str, lock: Path) -> None:
    python = venv / "bin" / "python"
    text = lock.read_text()
    if installer == "pip":
        run([str(python), "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps",
             "-r", str(lock)])  # fmt: skip
        run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", "-e", str(REPO)])  # fmt: skip
        return
    uv = shutil.which("uv")
    if uv is None:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as only_uv:
            only_uv.write(entry(text, "uv"))
            only_uv.flush()
            run([str(python), "-m", "pip", "install", "--quiet", "--require-hashes",
                 "--no-deps", "-r", only_uv.name])  # fmt: skip
        uv = str(venv / "bin" / "uv")
    env = {**os.environ, "UV_NO_PROGRESS": "1"}
    common = [uv, "pip", "install", "--python", str(python), "--no-deps"]
    indexes = [*pip_indexes(python), "--index-strategy", "unsafe-first-match"]
    run([*common, "--require-hashes", *indexes, "-r", str(lock)], env)
    run([*common, "--no-build-isolation", "-e", str(REPO)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("install", help="install the lock into an existing venv")
    setup.add_argument("--venv", required=True, type=Path)
    setup.add_argument("--installer", choices=["uv", "pip"], default="uv")
    setup.add_argument("--lock", type=Path, default=LOCK)
    args = parser.parse_args()
    try:
        install(args.venv, args.installer, args.lock)
    except subprocess.CalledProcessError as error:
        print(f"error: {error.cmd[0]} failed with status {error.returncode}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
