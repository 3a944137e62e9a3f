"""Regenerate the result tables of README.md from the runs' own files (`make figures`).

Each table sits between two markers in README.md:

    <!-- figures:runs:begin --> ... <!-- figures:runs:end -->
    <!-- figures:throughput:begin --> ... <!-- figures:throughput:end -->

`runs`: one row per workflow run, from ``<results>/report/metrics.json`` (ensemble, segmentation,
flagged models), the job benchmark files ``<results>/benchmarks/**/*.tsv`` and, where present,
the wall time that `make demo` records in ``<results>/logs/run_time.json``. `throughput`: one
row per task of a ``bench/run_benchmark.py`` JSON report. A row is replaced when its run's
files are here; rows of runs whose files are absent stay as they are, so that `make figures`
on a machine with only the demo keeps the other rows.

  python tools/readme_figures.py --run demo=results/demo --bench real=results/bench/real.json
  python tools/readme_figures.py --check   # exit 1 if README.md's tables are not in this form
"""

from __future__ import annotations

import argparse
import json
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
]
THROUGHPUT_COLUMNS = [
    "benchmark",
    "task",
    "model",
    "limit train",
    "workflow train",
    "ratio",
    "naive train",
    "limit infer",
    "workflow infer",
    "data path share",
]
# Table name -> (columns, how many leading cells identify a row).
TABLES = {"runs": (RUN_COLUMNS, 1), "throughput": (THROUGHPUT_COLUMNS, 2)}
RIGHT = {"test slices", "ensemble accuracy", "tumor F1", "ROC AUC", "time", "ratio"}
RIGHT |= {c for c in THROUGHPUT_COLUMNS if c.startswith(("limit", "workflow", "data", "naive"))}


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
        rows.append(
            [
                name,
                task,
                entry["model"],
                _f(limit["train_ips"], 1),
                _f(flow["train_ips"], 1),
                _ratio(entry, "train_ratio"),
                _f(naive.get("train_ips"), 1),
                _f(limit["infer_ips"], 1),
                _f(flow["infer_ips"], 1),
                "n/a" if share is None else f"{100 * share:.1f} %",
            ]
        )
    return rows


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


def render(text: str, generated: dict[str, list[list[str]]]) -> str:
    """README text with each table rewritten: the generator's header, merged rows."""
    for table, (columns, key) in TABLES.items():
        _, rows = read_table(text, table)
        rows = merge(rows, generated.get(table, []), key)
        start, stop = block(text, table)
        body = "\n".join(header(columns) + [row_line(r) for r in rows]) + "\n"
        text = text[:start] + body + text[stop:]
    return text


def problems(text: str) -> list[str]:
    """How README tables differ in form from what the generator writes."""
    found = []
    for table, (columns, _) in TABLES.items():
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
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--run", action="append", default=[], help="NAME=RESULTS_DIR")
    parser.add_argument("--bench", action="append", default=[], help="NAME=BENCHMARK.json")
    parser.add_argument("--check", action="store_true", help="only check the tables' form")
    args = parser.parse_args()
    text = args.readme.read_text()
    if args.check:
        found = problems(text)
        for problem in found:
            print(f"{args.readme}: {problem}", file=sys.stderr)
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
    new = render(text, generated)
    if new != text:
        args.readme.write_text(new)
    print(f"{args.readme}: {'updated' if new != text else 'unchanged'}")


if __name__ == "__main__":
    main()
