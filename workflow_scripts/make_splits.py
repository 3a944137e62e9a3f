"""Patient-level (default) or slice-level splits: test, validation and segmentation folds."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainmri.data.splits import make_splits, split_summary
from brainmri.io import run_cli, setup_logging, write_csv
from brainmri.tables import read_manifest


def boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--level", choices=["patient", "slice"], default="patient")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--second-dataset", type=boolean, default=True)
    parser.add_argument("--splits", required=True, type=Path)
    parser.add_argument("--summary", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    manifest = read_manifest(args.manifest)
    splits = make_splits(
        manifest,
        args.level,
        args.test_fraction,
        args.val_fraction,
        args.folds,
        args.seed,
        args.second_dataset,
    )
    summary = split_summary(manifest, splits)
    write_csv(args.splits, splits)
    write_csv(args.summary, summary, sep="\t")
    log.info("Splits (%s level):\n%s", args.level, summary.to_string(index=False))


if __name__ == "__main__":
    run_cli(main)
