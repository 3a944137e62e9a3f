"""Short progress lines for a Snakemake run (`make demo`): Snakemake's output is piped in,
kept whole in --log, and one line per started job is printed with the elapsed time, the stage
and how many steps are done. On failure, the error part of the output is printed too.

  snakemake ... 2>&1 | python tools/progress.py --log results/demo/logs/snakemake.log \
      --summary results/demo/logs/run_time.json

--summary records the wall time of a run that did something (for `make figures`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

# Every rule of rules/*.smk, by stage (tests/test_readme_figures.py checks that none is missing).
STAGES = {
    "data": ("fetch", "preprocess_lgg", "preprocess_btm", "manifest", "split"),
    "weights": ("download_weights",),
    "classification": (
        "train_classifier",
        "evaluate_classifier",
        "segmentation_voter",
        "ensemble_classifiers",
    ),
    "segmentation": (
        "train_segmenter",
        "evaluate_segmenter",
        "train_segmenter_final",
        "evaluate_segmenter_final",
        "segmentation_fold_ensemble",
        "summarize_segmentation",
    ),
    "cascade + report": ("cascade", "report", "all"),
    "predict": ("predict_new_images", "predict", "predict_patient_volumes", "predict_volume"),
}
STAGE_OF = {rule: stage for stage, rules in STAGES.items() for rule in rules}
RULE = re.compile(r"^(?:local)?rule (\w+):")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
STEPS = re.compile(r"^(\d+) of (\d+) steps")
ERROR = re.compile(r"^(Error|.*Exception|WorkflowError|MissingInputException)")


def stage_of(rule: str) -> str:
    return STAGE_OF.get(rule, "other")


class Progress:
    def __init__(self, out=sys.stdout) -> None:
        self.out, self.start = out, time.monotonic()
        self.done, self.total, self.jobs = 0, None, 0
        self.pending: str | None = None
        self.errors: list[str] = []
        self.in_error = False

    def stamp(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"[{seconds // 60:02d}:{seconds % 60:02d}]"

    def _flush_job(self, wildcards: str = "") -> None:
        if self.pending is None:
            return
        total = "?" if self.total is None else self.total
        detail = f" {wildcards}" if wildcards else ""
        print(
            f"{self.stamp()} {self.done}/{total} done · {stage_of(self.pending)}: "
            f"{self.pending}{detail}",
            file=self.out,
            flush=True,
        )
        self.pending = None
        self.jobs += 1

    def feed(self, line: str) -> None:
        if match := RULE.match(line):
            self._flush_job()
            self.pending = match[1]
        elif (match := WILDCARDS.match(line)) and self.pending:
            self._flush_job(match[1].replace(", ", " "))
        elif match := STEPS.match(line):
            self._flush_job()
            self.done, self.total = int(match[1]), int(match[2])
        elif line.startswith(("Nothing to be done", "Complete log")):
            self._flush_job()
            print(f"{self.stamp()} {line.strip()}", file=self.out, flush=True)
        if ERROR.match(line):
            self.in_error = True
        if self.in_error:
            self.errors.append(line.rstrip("\n"))

    def finish(self) -> None:
        self._flush_job()
        if self.errors:
            print("\n".join(self.errors[-80:]), file=self.out, flush=True)
        else:
            steps = "" if self.total is None else f" ({self.done} of {self.total} steps)"
            print(f"{self.stamp()} finished{steps}", file=self.out, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log", required=True, type=Path, help="Snakemake's whole output")
    parser.add_argument("--summary", type=Path, help="JSON with the run's wall time")
    args = parser.parse_args()
    progress = Progress()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("w") as log:
        for line in sys.stdin:
            log.write(line)
            progress.feed(line)
    progress.finish()
    print(f"Snakemake's whole output: {args.log}")
    if args.summary and progress.jobs and not progress.errors:
        wall = round(time.monotonic() - progress.start, 1)
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps({"wall_s": wall, "jobs": progress.jobs}) + "\n")


if __name__ == "__main__":
    main()
