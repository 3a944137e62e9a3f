"""Regenerate the result tables of README.md and docs/performance.md from the runs' own files
(`make figures`).

Each table sits between two markers, in one of the documents (--doc, repeatable):

    <!-- figures:runs:begin --> ... <!-- figures:runs:end -->                (README.md)
    <!-- figures:throughput:begin --> ... <!-- figures:throughput:end -->    (docs/performance.md)

`runs`: one row per workflow run, from ``<results>/report/metrics.json`` (ensemble, segmentation,
flagged models), the job benchmark files ``<results>/benchmarks/**/*.tsv`` and, where present,
the wall time that `make demo` records in ``<results>/logs/run_time.json``. `throughput`: one
row per task of a ``bench/run_benchmark.py`` JSON report. A row is replaced when its run's
files are here; rows of runs whose files are absent stay as they are, so that `make figures`
on a machine with only the demo keeps the other rows.

Every row ends with the commit its numbers came from (a run's report/metrics.json provenance;
a benchmark JSON's `git_commit`; for an older row without one, the last commit that changed its
line). A row whose commit does not contain the last change to config/, brainmri/ or rules/ is
marked `stale` there (each `make figures` re-marks them), and `--check` fails on a row without
its commit or with an unmarked stale one: a stale row stays visible until its run is redone.

  python tools/readme_figures.py --run demo=results/demo --bench real=results/bench/real.json
  python tools/readme_figures.py --check   # exit 1 if a table is not in this form, or stale
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

RUN_COLUMNS = [
    "run",
    "data / split",
    "test slices",
    "ensemble accuracy",
    "tumor F1",
    "ROC AUC",
    "fold-ensemble test Dice (tumor slices)",
    "flagged models",
    "time",
    "commit",
]
THROUGHPUT_COLUMNS = [
    "benchmark",
    "task",
    "model",
    "fp32 eager train",
    "limit train",
    "workflow train",
    "vs fp32 eager",
    "ratio",
    "naive train",
    "fp32 eager infer",
    "limit infer",
    "workflow infer",
    "vs fp32 eager (infer)",
    "data path share",
    "commit",
]
# Table name -> (columns, how many leading cells identify a row).
TABLES = {"runs": (RUN_COLUMNS, 1), "throughput": (THROUGHPUT_COLUMNS, 2)}
DOCS = [REPO / "README.md", REPO / "docs" / "performance.md"]
# A change here can change any run's numbers.
CODE = ("config", "brainmri", "rules")
STALE = "stale"
COMMIT = re.compile(r"^([0-9a-f]{7,40}|unknown)(\+)?(, stale)?$")
RIGHT = {"test slices", "ensemble accuracy", "tumor F1", "ROC AUC", "time", "ratio"}
RIGHT |= {
    c
    for c in THROUGHPUT_COLUMNS
    if c.startswith(("limit", "workflow", "data", "naive", "fp32", "vs fp32"))
}


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def header(columns: list[str]) -> list[str]:
    align = ["---:" if c in RIGHT else "---" for c in columns]
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]


def row_line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def cells_of(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _flagged(checks: dict[str, Any] | None) -> str:
    if checks is None:
        return "n/a"
    names = [d["model"] for d in checks["classification"]["degenerate"]]
    names += [f"{d['architecture']} fold {d['fold']}" for d in checks["segmentation"]["degenerate"]]
    return ", ".join(names) if names else "none"


def _job_seconds(results: Path) -> tuple[int, float]:
    jobs, total = 0, 0.0
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        lines = path.read_text().splitlines()
        if len(lines) >= 2:
            jobs += 1
            total += float(lines[1].split("\t")[0])
    return jobs, total


def run_row(name: str, results: Path) -> list[str]:
    """The `runs` row of one results directory (its report/metrics.json must exist)."""
    metrics = json.loads((results / "report" / "metrics.json").read_text())
    ens = metrics["classification"]["ensemble"]
    dice = ", ".join(
        f"{arch} {_f(s['test_fold_ensemble']['dice'])}"
        for arch, s in metrics["segmentation"].items()
    )
    jobs, seconds = _job_seconds(results)
    time = f"{seconds / 60:.1f} min in {jobs} benchmarked jobs"
    run_time = results / "logs" / "run_time.json"
    if run_time.is_file():
        wall = json.loads(run_time.read_text())["wall_s"]
        time = f"{wall / 60:.1f} min wall; " + time
    return [
        name,
        f"{metrics['data_source']} / {metrics['split_level']}",
        str(ens["test_slices"]),
        _f(ens["accuracy"]),
        _f(ens["tumor_f1"]),
        _f(ens["roc_auc"]),
        dice,
        _flagged(metrics.get("checks")),
        time,
        short_commit(metrics.get("provenance", {}).get("git_commit")),
    ]


def _ratio(entry: dict[str, Any], key: str) -> str:
    value, span = entry.get(key), entry.get(key + "_range")
    if value is None:
        return "n/a"
    if not span or span[0] == span[1]:
        return f"{value:.2f}"
    return f"{value:.2f} ({span[0]:.2f}-{span[1]:.2f})"


def throughput_rows(name: str, report: dict[str, Any]) -> list[list[str]]:
    """The `throughput` rows of one benchmark JSON report (images/s)."""
    rows = []
    for task, entry in report.get("tasks", {}).items():
        limit, flow = entry["limit"], entry["workflow"]
        share = flow.get("breakdown", {}).get("data_share")
        naive = entry.get("naive") or {}
        fp32 = entry.get("limit_fp32") or {}  # absent in reports from before the plan
        rows.append(
            [
                name,
                task,
                entry["model"],
                _f(fp32.get("train_ips"), 1),
                _f(limit["train_ips"], 1),
                _f(flow["train_ips"], 1),
                _ratio(entry, "train_vs_fp32"),
                _ratio(entry, "train_ratio"),
                _f(naive.get("train_ips"), 1),
                _f(fp32.get("infer_ips"), 1),
                _f(limit["infer_ips"], 1),
                _f(flow["infer_ips"], 1),
                _ratio(entry, "infer_vs_fp32"),
                "n/a" if share is None else f"{100 * share:.1f} %",
                short_commit(report.get("git_commit")),
            ]
        )
    return rows


def git(*args: str) -> str | None:
    """A git command's output in this repository, or None (no git, not a repository)."""
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def short_commit(commit: str | None) -> str:
    """A provenance commit ("<sha>" or "<sha> (with uncommitted changes)") as `abc1234[+]`."""
    match = re.match(r"([0-9a-f]{7,40})", commit or "")
    if not match:
        return "unknown"
    return match[1][:7] + ("+" if "uncommitted" in (commit or "") else "")


def last_code_change() -> str | None:
    """The last commit that changed config/, brainmri/ or rules/ (None without git)."""
    return git("log", "-1", "--format=%H", "--", *CODE) or None


def is_stale(cell: str, last_change: str | None) -> bool:
    """A row made at ``cell``'s commit predates ``last_change`` (not one of its ancestors'
    descendants). Unknown commits are stale; without git nothing is."""
    if last_change is None:
        return False
    match = COMMIT.match(cell)
    if not match or match[1] == "unknown":
        return True
    return git("merge-base", "--is-ancestor", last_change, match[1]) is None


def mark(cell: str, last_change: str | None) -> str:
    """The commit cell with `, stale` set or cleared."""
    bare = cell.removesuffix(", " + STALE)
    return bare + (", " + STALE if is_stale(bare, last_change) else "")


def commit_of_line(line: str, path: Path) -> str:
    """The last commit that changed a line of ``path`` (a row from before the commit column)."""
    found = git("log", "-1", "--format=%h", "-S", line, "--", str(path.relative_to(REPO)))
    return (found or "unknown")[:7]


def block(text: str, table: str) -> tuple[int, int]:
    """Start and end offsets of the lines between a table's markers."""
    begin, end = f"<!-- figures:{table}:begin -->\n", f"<!-- figures:{table}:end -->"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise SystemExit(f"README: markers of table {table!r} not found ({begin.strip()})")
    return start + len(begin), stop


def read_table(text: str, table: str) -> tuple[list[str], list[list[str]]]:
    """(header lines, rows) of a README table."""
    start, stop = block(text, table)
    lines = [line for line in text[start:stop].splitlines() if line.strip()]
    if not lines:
        return [], []
    separator = [k for k, line in enumerate(lines[1:2], 1) if set(line) <= set("|-: ")]
    body = lines[1 + len(separator) :]
    return lines[: 1 + len(separator)], [cells_of(line) for line in body]


def merge(old: list[list[str]], new: list[list[str]], key: int) -> list[list[str]]:
    """``old`` rows with those of the same key replaced by ``new``; new keys appended."""
    fresh = {tuple(r[:key]): r for r in new}
    merged = [fresh.pop(tuple(r[:key]), r) for r in old]
    return merged + list(fresh.values())


def tables_in(text: str) -> list[str]:
    return [table for table in TABLES if f"<!-- figures:{table}:begin -->" in text]


def render(
    text: str,
    generated: dict[str, list[list[str]]],
    last_change: str | None = None,
    path: Path | None = None,
) -> str:
    """A document's text with each of its tables rewritten: the generator's header, merged rows,
    every row's commit (an old row without one gets its line's last commit in ``path``) marked
    stale or not against ``last_change``."""
    for table in tables_in(text):
        columns, key = TABLES[table]
        _, rows = read_table(text, table)
        old = text[slice(*block(text, table))].splitlines()
        for row in rows:
            if len(row) == len(columns) - 1 and path is not None:
                line = next(line for line in old if cells_of(line) == row)
                row.append(commit_of_line(line, path))
        rows = merge(rows, generated.get(table, []), key)
        rows = [[*r[:-1], mark(r[-1], last_change)] if len(r) == len(columns) else r for r in rows]
        start, stop = block(text, table)
        body = "\n".join(header(columns) + [row_line(r) for r in rows]) + "\n"
        text = text[:start] + body + text[stop:]
    return text


def problems(text: str, last_change: str | None = None) -> list[str]:
    """How a document's tables differ in form from what the generator writes, and their rows
    without a commit or stale without the mark."""
    found = []
    for table in tables_in(text):
        columns, _ = TABLES[table]
        head, rows = read_table(text, table)
        if head != header(columns):
            found.append(f"table {table}: header is not {header(columns)[0]}")
        found += [
            f"table {table}: row {r[0]!r} has {len(r)} cells, not {len(columns)}"
            for r in rows
            if len(r) != len(columns)
        ]
        if not rows:
            found.append(f"table {table}: no rows")
        for row in rows:
            if len(row) != len(columns):
                continue
            if not COMMIT.match(row[-1]):
                found.append(f"table {table}: row {row[0]!r} has no commit ({row[-1]!r})")
            elif is_stale(row[-1], last_change) and not row[-1].endswith(", " + STALE):
                found.append(
                    f"table {table}: row {' '.join(row[:2])!r} comes from {row[-1]}, before the "
                    f"last change to {', '.join(c + '/' for c in CODE)}: rerun its run and "
                    "`make figures`, or `make figures` to mark it stale"
                )
    return found


def _pairs(values: list[str], option: str) -> list[tuple[str, Path]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{option} {value!r}: expected NAME=PATH")
        pairs.append((name, Path(path)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--doc", action="append", type=Path, help="a document with tables (default: " + ", ".join(
            str(p.relative_to(REPO)) for p in DOCS) + ")"
    )  # fmt: skip
    parser.add_argument("--run", action="append", default=[], help="NAME=RESULTS_DIR")
    parser.add_argument("--bench", action="append", default=[], help="NAME=BENCHMARK.json")
    parser.add_argument("--check", action="store_true", help="only check the tables")
    args = parser.parse_args()
    docs = args.doc or DOCS
    last_change = last_code_change()
    if args.check:
        found = [
            f"{doc}: {problem}"
            for doc in docs
            for problem in problems(doc.read_text(), last_change)
        ]
        for problem in found:
            print(problem, file=sys.stderr)
        sys.exit(1 if found else 0)
    generated: dict[str, list[list[str]]] = {"runs": [], "throughput": []}
    for name, results in _pairs(args.run, "--run"):
        if (results / "report" / "metrics.json").is_file():
            generated["runs"].append(run_row(name, results))
        else:
            print(f"{results}/report/metrics.json not found: row {name!r} kept as it is")
    for name, path in _pairs(args.bench, "--bench"):
        if path.is_file():
            generated["throughput"] += throughput_rows(name, json.loads(path.read_text()))
        else:
            print(f"{path} not found: throughput rows of {name!r} kept as they are")
    for doc in docs:
        text = doc.read_text()
        path = doc.resolve() if doc.resolve().is_relative_to(REPO) else None
        new = render(text, generated, last_change, path)
        if new != text:
            doc.write_text(new)
        print(f"{doc}: {'updated' if new != text else 'unchanged'}")
        for problem in problems(new, last_change):
            print(f"{doc}: {problem}")


if __name__ == "__main__":
    main()
