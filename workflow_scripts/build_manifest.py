"""Merge the per-dataset manifest parts into data/manifest.csv."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainmri.data.preprocess import merge_manifests
from brainmri.io import run_cli, setup_logging, write_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", nargs="+", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    manifest = merge_manifests(args.parts)
    write_csv(args.output, manifest)
    counts = manifest.groupby(["source", "label"]).size()
    log.info("Manifest: %d rows\n%s", len(manifest), counts.to_string())


if __name__ == "__main__":
    run_cli(main)
