"""Predict tumor / no tumor and a tumor mask for every image of a folder with the run's trained
models and ensemble, as evaluated (brainmri/evaluation/decision.py). A file that cannot be read
is skipped with one line (its traceback in --details), listed in the CSV and in --failures; the
others are still predicted. Exit status: 0 when every file was predicted, 1 when any was
skipped (--allow-skipped: 0 all the same, as the workflow's rule runs it).

  python workflow_scripts/predict.py --input-dir my_scans \\
      --classifiers results/classification/{resnet50,inception_v3,inception_resnet_v2}/model.pt \\
      --segmenters results/segmentation/deeplabv3plus/fold*/model.pt \\
      --method majority --classifier-threshold 0.5 --segmentation-threshold 0.5 \\
      --segmentation-voter results/classification/segvoter/min_pixels.json \\
      --output my_scans_predicted/predictions.csv \\
      --masks-dir my_scans_predicted/masks --overlays-dir my_scans_predicted/overlays

--segmentation-voter (the run's min_pixels.json, when classification.segmentation_voter is on)
adds the segmentation voter with the run's k. Outputs mirror the input's relative paths;
*_mask.* files are not predicted, and an image with its _mask beside it gets a Dice.
--series: images named <patient>_<n>.<ext> in one folder are one patient's slices, so that
--postprocess and --smooth-window apply per patient as in the evaluation (without it neither
applies: the images are independent).

(The `predict` rule passes the run's models and ensemble: `snakemake predict --configfile
config/demo.yaml --config predict='{input_dir: my_scans}'`.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainmri.evaluation.decision import add_ensemble_arguments, ensemble_rule
from brainmri.inference.predict import predict_folder
from brainmri.io import run_cli, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--input-dir", required=True, type=Path)
    parser.add_argument("--classifiers", nargs="+", required=True, type=Path, help="model.pt")
    parser.add_argument(
        "--segmenters", nargs="+", required=True, type=Path, help="one architecture's folds"
    )
    add_ensemble_arguments(parser)
    parser.add_argument(
        "--series", action="store_true", help="<patient>_<n> images are a patient's slices"
    )
    parser.add_argument("--output", required=True, type=Path, help="predictions CSV")
    parser.add_argument("--masks-dir", required=True, type=Path)
    parser.add_argument("--overlays-dir", required=True, type=Path)
    parser.add_argument(
        "--failures", type=Path, help="CSV of the unreadable files (default: beside --output)"
    )
    parser.add_argument(
        "--data-source",
        choices=["kaggle", "local", "synthetic"],
        help="data.source of the models (default: from their results' report/metrics.json)",
    )
    parser.add_argument(
        "--details",
        type=Path,
        help="the errors with their tracebacks (default: failures.log beside --failures)",
    )
    parser.add_argument(
        "--allow-skipped", action="store_true", help="exit with status 0 even if a file was skipped"
    )
    args = parser.parse_args()
    failures_csv = args.failures or args.output.parent / "failures.csv"
    log = setup_logging(details=args.details or failures_csv.with_suffix(".log"))
    failures = predict_folder(
        args.input_dir,
        args.classifiers,
        args.segmenters,
        ensemble_rule(args),
        args.segmentation_threshold,
        args.output,
        args.masks_dir,
        args.overlays_dir,
        failures_csv,
        args.data_source,
        tta=args.tta,
        post=args.postprocess,
        series=args.series,
    )
    log.info("Predictions written to %s", args.output)
    if failures:
        log.error(
            "%d file(s) could not be read and were skipped: %s",
            len(failures),
            "; ".join(f"{name} ({reason})" for name, reason in failures),
        )
        print(
            f"{len(failures)} file(s) could not be read and were skipped: "
            + ", ".join(name for name, _ in failures),
            file=sys.stderr,
        )
        if not args.allow_skipped:
            sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
