"""Predict tumor / no tumor and a tumor mask for every image of a folder with a trained results
directory. Unreadable files are reported by name and skipped; the exit status is then 1.

  python workflow_scripts/predict.py --input-dir my_scans --results-dir results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainmri.inference.predict import predict_folder
from brainmri.io import run_cli, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--input-dir", required=True, type=Path)
    parser.add_argument("--results-dir", default=Path("results"), type=Path)
    parser.add_argument(
        "--architecture",
        default="deeplabv3plus",
        help="segmentation architecture (name in the config) whose folds to use",
    )
    parser.add_argument("--method", choices=["majority", "soft"], default="majority")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument(
        "--output", type=Path, help="CSV (default: <results>/predict/predictions.csv)"
    )
    parser.add_argument("--masks-dir", type=Path)
    parser.add_argument("--overlays-dir", type=Path)
    args = parser.parse_args()
    log = setup_logging()
    out = args.results_dir / "predict"
    failures = predict_folder(
        args.input_dir,
        args.results_dir,
        args.architecture,
        args.method,
        args.threshold,
        args.output or out / "predictions.csv",
        args.masks_dir or out / "masks",
        args.overlays_dir or out / "overlays",
    )
    if failures:
        log.error(
            "%d file(s) could not be read and were skipped: %s", len(failures), "; ".join(failures)
        )
        print(
            f"{len(failures)} file(s) could not be read: "
            + ", ".join(f.split(" (")[0] for f in failures),
            file=sys.stderr,
        )
        sys.exit(1)
    log.info("Predictions written to %s", args.output or out / "predictions.csv")


if __name__ == "__main__":
    run_cli(main)
