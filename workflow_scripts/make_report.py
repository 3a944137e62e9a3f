"""Build the run's self-contained HTML report and report/metrics.json from the files the report
rule declares (--files: role -> file(s), rules/report.smk); no other file is read."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brainmri.io import run_cli, setup_logging, write_json, write_text
from brainmri.reporting.inputs import ReportFiles
from brainmri.reporting.provenance import provenance
from brainmri.reporting.report import build_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", required=True, help="JSON: role -> file(s) the report reads")
    parser.add_argument("--config", required=True, help="the run's config as JSON")
    parser.add_argument("--html", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    config = json.loads(args.config)
    files = ReportFiles.from_json(args.files)
    page, metrics = build_report(files, config, provenance(Path(__file__).parents[1]))
    write_json(args.metrics, metrics)
    write_text(args.html, page)
    log.info("Report: %s (%.1f MB)", args.html, len(page) / 1e6)


if __name__ == "__main__":
    run_cli(main)
