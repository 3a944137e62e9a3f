"""`make figures`: the README's result tables and their generator agree in form; the generator
turns a run's files into rows and keeps the rows of runs it does not see."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_CONFIG, snakemake


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures():
    return _load("readme_figures")


def fake_run(root: Path, checks: dict | None = None, commit: str = "0123456789abcdef") -> Path:
    """A results directory holding what the generator reads."""
    metrics = {
        "data_source": "synthetic",
        "split_level": "patient",
        "classification": {
            "ensemble": {"test_slices": 35, "accuracy": 0.9, "tumor_f1": 0.8571, "roc_auc": 0.95}
        },
        "segmentation": {
            "unet": {"test_fold_ensemble": {"dice": 0.6751}},
            "deeplabv3plus": {"test_fold_ensemble": {"dice": None}},
        },
        "provenance": {"git_commit": commit},
    }
    if checks is not None:
        metrics["checks"] = checks
    (root / "report").mkdir(parents=True)
    (root / "report" / "metrics.json").write_text(json.dumps(metrics))
    for name, seconds in (("a", 30.0), ("b", 60.0)):
        path = root / "benchmarks" / "x" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"s\th:m:s\n{seconds}\t0:00:30\n")
    (root / "logs").mkdir()
    (root / "logs" / "run_time.json").write_text('{"wall_s": 150.0, "jobs": 2}')
    return root


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_tables_have_the_generators_form_and_no_unmarked_stale_row(figures):
    """README.md's and docs/performance.md's tables: every row has its commit, and a row made
    before the last change to config/, brainmri/ or rules/ says `stale` (`make figures`)."""
    last = figures.last_code_change()
    for doc in figures.DOCS:
        text = doc.read_text()
        assert figures.problems(text, last) == [], doc
        # Regenerating with no run at hand changes nothing: the document is in the generator's form.
        assert figures.render(text, {}, last, doc) == text, doc
    _, rows = figures.read_table((REPO / "README.md").read_text(), "runs")
    assert {"demo", "cpu"} <= {r[0] for r in rows}
    _, rows = figures.read_table((REPO / "docs" / "performance.md").read_text(), "throughput")
    assert rows


def test_a_run_becomes_a_row(figures, tmp_path):
    checks = {
        "classification": {"degenerate": [{"model": "resnet10t"}]},
        "segmentation": {"degenerate": [{"architecture": "unet", "fold": 0}]},
    }
    row = figures.run_row("demo", fake_run(tmp_path / "r", checks))
    assert row == [
        "demo",
        "synthetic / patient",
        "35",
        "0.900",
        "0.857",
        "0.950",
        "unet 0.675, deeplabv3plus n/a",
        "resnet10t, unet fold 0",
        "2.5 min wall; 1.5 min in 2 benchmarked jobs",
        "0123456",
    ]
    assert len(row) == len(figures.RUN_COLUMNS)
    dirty = fake_run(tmp_path / "d", commit="0123456789abcdef (with uncommitted changes)")
    assert figures.run_row("demo", dirty)[-1] == "0123456+"


def test_stale_rows_are_marked_and_unmarked_ones_fail_the_check(figures):
    """A row from the repository's first commit predates the last code change: --check fails
    until `make figures` marks it; a row from HEAD is fresh; a row without a commit fails."""
    try:
        first, head = (
            git("rev-list", "--max-parents=0", "HEAD").split()[0][:7],
            git("rev-parse", "--short=7", "HEAD"),
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    last = figures.last_code_change()
    assert last is not None
    cells = ["x", "synthetic / patient", "1", "1", "1", "1", "-", "none", "1 min"]
    text = (
        "<!-- figures:runs:begin -->\n"
        + "\n".join(figures.header(figures.RUN_COLUMNS))
        + "\n" + figures.row_line(["old", *cells[1:], first])
        + "\n" + figures.row_line(["new", *cells[1:], head])
        + "\n<!-- figures:runs:end -->\n"
    )  # fmt: skip
    found = figures.problems(text, last)
    assert len(found) == 1 and "'old synthetic / patient' comes from" in found[0], found
    marked = figures.render(text, {}, last)
    assert figures.problems(marked, last) == []
    _, rows = figures.read_table(marked, "runs")
    assert [r[-1] for r in rows] == [f"{first}, stale", head]
    # A rerun of the old run at HEAD clears the mark.
    rerun = figures.render(marked, {"runs": [["old", *cells[1:], head]]}, last)
    assert [r[-1] for r in figures.read_table(rerun, "runs")[1]] == [head, head]
    no_commit = text.replace(f"| {first} |", "| 3.7 min |")
    assert "has no commit" in " ".join(figures.problems(no_commit, last))


def test_cli_replaces_its_rows_and_keeps_the_others(figures, tmp_path):
    readme = tmp_path / "README.md"
    head = git("rev-parse", "--short=7", "HEAD")
    readme.write_text(
        "intro\n<!-- figures:runs:begin -->\n"
        + "\n".join(figures.header(figures.RUN_COLUMNS))
        + f"\n| demo | old | 1 | 0 | 0 | 0 | - | none | 9 min | {head} |\n"
        + f"| cpu | kept | 2 | 0 | 0 | 0 | - | none | 9 min | {head} |\n"
        + "<!-- figures:runs:end -->\nend\n"
    )
    perf = tmp_path / "performance.md"
    perf.write_text(
        "<!-- figures:throughput:begin -->\n"
        + "\n".join(figures.header(figures.THROUGHPUT_COLUMNS))
        + f"\n| real | classification | m | 1 | 1 | 1 | 1.00 | 1.00 | 1 | 1 | 1 | 1 | 1.00 | 1 % "
        f"| {head} |\n" + "<!-- figures:throughput:end -->\n"
    )
    run = fake_run(tmp_path / "demo", commit=git("rev-parse", "HEAD"))
    bench = tmp_path / "bench.json"
    entry = {
        "model": "U-Net",
        "limit": {"train_ips": 10.0, "infer_ips": 30.0},
        "workflow": {"train_ips": 9.0, "infer_ips": 33.0, "breakdown": {"data_share": 0.012}},
        "naive": {"train_ips": 8.0},
        "limit_fp32": {"train_ips": 5.0, "infer_ips": 15.0},
        "train_ratio": 0.9,
        "train_ratio_range": [0.85, 0.95],
        "train_vs_fp32": 1.8,
        "train_vs_fp32_range": [1.7, 1.9],
        "infer_vs_fp32": 2.2,
    }
    bench.write_text(json.dumps({"tasks": {"segmentation": entry}, "git_commit": head}))
    command = [sys.executable, str(REPO / "tools" / "readme_figures.py")]
    command += ["--doc", str(readme), "--doc", str(perf)]
    runs = ["--run", f"demo={run}", "--run", f"cpu={tmp_path / 'absent'}"]
    subprocess.run(
        [*command, *runs, "--bench", f"real={bench}"],
        check=True,
        capture_output=True,
    )
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n")
    _, runs = figures.read_table(text, "runs")
    assert [r[0] for r in runs] == ["demo", "cpu"]
    assert runs[0][3] == "0.900" and runs[1][1] == "kept" and runs[0][-1] == head
    _, rows = figures.read_table(perf.read_text(), "throughput")
    assert rows[0][:2] == ["real", "classification"]  # not in the JSON: kept
    assert rows[1] == [
        "real",
        "segmentation",
        "U-Net",
        "5.0",
        "10.0",
        "9.0",
        "1.80 (1.70-1.90)",
        "0.90 (0.85-0.95)",
        "8.0",
        "15.0",
        "30.0",
        "33.0",
        "2.20",
        "1.2 %",
        head,
    ]
    assert subprocess.run([*command, "--check"], capture_output=True).returncode == 0
    readme.write_text(text.replace("| ensemble accuracy |", "| accuracy |"))
    check = subprocess.run([*command, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "header" in check.stderr


def test_progress_lines_per_job_and_errors(tmp_path):
    progress = _load("progress")
    import io

    out = io.StringIO()
    watcher = progress.Progress(out)
    for line in [
        "localrule fetch:\n",
        "    jobid: 1\n",
        "    wildcards: dataset=lgg\n",
        "1 of 9 steps (11%) done\n",
        "rule train_segmenter:\n",
        "    wildcards: arch=unet, fold=1\n",
        "Error in rule train_segmenter:\n",
        "    log: x.log\n",
    ]:
        watcher.feed(line)
    watcher.finish()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("0/? done · data: fetch dataset=lgg")
    assert "1/9 done · segmentation: train_segmenter arch=unet fold=1" in lines[1]
    assert lines[2:] == ["Error in rule train_segmenter:", "    log: x.log"]
    assert watcher.jobs == 2


def test_every_rule_has_a_progress_stage():
    """`make demo`'s lines name a stage for every rule Snakemake knows (also `use rule` ones)."""
    listed = snakemake("--list-rules", "--configfile", str(TINY_CONFIG))
    assert listed.returncode == 0, listed.stderr[-3000:]
    rules = {line.split()[0] for line in listed.stdout.splitlines() if line[:1].isalpha()}
    assert {"fetch", "segmentation_voter", "train_segmenter_final", "report"} <= rules
    stages = _load("progress").STAGE_OF
    assert sorted(rules - set(stages)) == []
    assert sorted(set(stages) - rules) == []  # no label for a rule that is gone


def test_readme_is_a_front_page_whose_layout_is_the_tree():
    """About one screen: what it does, the two commands, a picture, the results, links; the
    Layout block is what tools/readme_layout.py makes of the tree (`make figures`)."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 90
    assert text.index("make demo") < text.index("make test") < text.index("## Results")
    picture = re.search(r"!\[[^\]]+\]\(([^)]+\.png)\)", text)
    assert picture and (REPO / picture[1]).is_file()
    for section in ("## Results", "## Predicting new scans", "## Performance", "## Layout"):
        assert section in text, section
    for link in re.findall(r"\]\(([^)#]+\.md)", text):
        assert (REPO / link).is_file(), link
    layout = _load("readme_layout")
    assert layout.render(text) == text, "Layout block differs from the tree: make figures"
    for folder in ("rules/", "config/", "docs/"):
        line = next(line for line in layout.layout().splitlines() if line.startswith(folder))
        pattern = {"rules/": "*.smk", "config/": "*", "docs/": "*.md"}[folder]
        assert line.split()[1:] == sorted(p.name for p in (REPO / folder).glob(pattern)), line


def test_a_new_top_level_entry_needs_a_layout_description(monkeypatch):
    layout = _load("readme_layout")
    monkeypatch.setattr(layout, "tracked_top_level", lambda: ["Snakefile", "newthing/"])
    with pytest.raises(SystemExit, match="no description for \\['newthing/'\\]"):
        layout.layout()
