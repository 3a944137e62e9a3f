"""Preprocess one dataset to 3-channel PNGs (+ binary mask PNGs), uint8 arrays and a manifest part.

preprocess.py lgg --raw-dir R --array-size 256 --png-dir D --images I.npy --masks M.npy --manifest C
preprocess.py btm --raw-dir R --array-size 256 --png-dir D --images I.npy --manifest C
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from brainmri.data.preprocess import preprocess_btm, preprocess_lgg
from brainmri.errors import InputError
from brainmri.io import run_cli, setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("dataset", choices=["lgg", "btm"])
    parser.add_argument("--raw-dir", required=True, type=Path)
    parser.add_argument("--array-size", type=int, default=256)
    parser.add_argument("--png-dir", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--masks", type=Path, help="LGG only")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    log = setup_logging()
    if not args.raw_dir.is_dir():
        raise InputError(f"{args.raw_dir}: raw data folder not found")
    start = time.perf_counter()
    if args.dataset == "lgg":
        if args.masks is None:
            parser.error("--masks is required for lgg")
        manifest = preprocess_lgg(
            args.raw_dir,
            args.array_size,
            args.png_dir,
            args.images,
            args.masks,
            args.manifest,
            args.threads,
        )
    else:
        manifest = preprocess_btm(
            args.raw_dir, args.array_size, args.png_dir, args.images, args.manifest, args.threads
        )
    seconds = time.perf_counter() - start
    log.info(
        "%d images in %.1f s (%.0f images/s, %d threads)",
        len(manifest),
        seconds,
        len(manifest) / seconds,
        args.threads,
    )


if __name__ == "__main__":
    run_cli(main)
