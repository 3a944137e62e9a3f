"""The README's "Layout" block, generated from the tree (`make figures` writes it; `--check`
exits 1 when README.md's block is not what the tree gives, e.g. after adding a rules file).

Each top-level entry that git tracks gets one line: its description below, followed for the
folders whose contents a newcomer looks for (rules, config, envs, profiles, the package's
stages, docs) by the names found there. A tracked entry without a description fails, so that a
new top-level file or folder is described here once.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- layout:begin -->\n", "<!-- layout:end -->"
DESCRIPTIONS = {
    "Snakefile": "the workflow: includes rules/*.smk",
    "rules/": "",
    "config/": "",
    "workflow_scripts/": "one thin CLI per step, run by the rules",
    "brainmri/": "the package, by stage:",
    "envs/": "conda env per rule group:",
    "profiles/": "",
    "report/": "captions of Snakemake's --report",
    "docs/": "",
    "tests/": "pytest suite (make test)",
    "bench/": "make bench, make quality and the GPU check",
    "tools/": "make demo's progress lines, make figures, the lock installer",
    "Makefile": "venv, lock, demo, test, lint, bench, figures",
    "requirements.txt": "the pins; requirements.lock: every package, exact, hashed",
    "requirements.lock": None,  # on requirements.txt's line
    "pyproject.toml": "the package, ruff and pytest settings",
    ".snakemake-workflow-catalog.yml": "the Snakemake workflow catalog's usage",
    ".ci/": "CI entry point (bash .ci/run: make test)",
    ".gitignore": None,
    "README.md": None,
}
# Folders whose entries are listed: folder -> (pattern, show folders instead of files).
LISTED = {
    "rules/": ("*.smk", False),
    "config/": ("*", False),
    "envs/": ("*.yaml", False),
    "profiles/": ("*", True),
    "brainmri/": ("*", True),
    "docs/": ("*.md", False),
}


def tracked_top_level() -> list[str]:
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    names = {f.split("/")[0] + ("/" if "/" in f else "") for f in files}
    return sorted(names, key=lambda n: (n.startswith("."), not n.endswith("/"), n.lower()))


def contents(folder: str) -> str:
    pattern, folders = LISTED[folder]
    found = sorted(
        p.name + ("/" if folders else "")
        for p in (REPO / folder).glob(pattern)
        if (p.is_dir() if folders else p.is_file()) and not p.name.startswith(("_", "."))
    )
    return "  ".join(found)


def layout() -> str:
    names = tracked_top_level()
    unknown = [n for n in names if n not in DESCRIPTIONS]
    if unknown:
        raise SystemExit(f"tools/readme_layout.py: no description for {unknown}")
    order = [n for n in DESCRIPTIONS if n in names and DESCRIPTIONS[n] is not None]
    lines = []
    for name in order:
        text = " ".join(
            t for t in (DESCRIPTIONS[name], contents(name) if name in LISTED else "") if t
        )
        lines.append(f"{name:<19}  {text}".rstrip())
    return "```\n" + "\n".join(lines) + "\n```\n"


def render(text: str) -> str:
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + layout() + text[stop:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = args.readme.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: the Layout block differs from the tree (make figures)")
        sys.exit(int(new != text))
    if new != text:
        args.readme.write_text(new)
    print(f"{args.readme}: layout {'updated' if new != text else 'unchanged'}")


if __name__ == "__main__":
    main()
