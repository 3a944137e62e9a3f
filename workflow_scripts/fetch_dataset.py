"""Fetch one raw dataset (Kaggle, local archive or folder, synthetic) and extract it safely.

Writes the extracted folder and a checksum manifest (path, bytes, sha256) of what arrived.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from brainmri.data.archives import ExtractionLimits, copy_tree, extract_archive
from brainmri.data.kaggle_client import DATASET_SLUGS, download_dataset
from brainmri.data.layout import record_source
from brainmri.data.synthetic import write_btm_archive, write_lgg_archive
from brainmri.errors import InputError
from brainmri.io import run_cli, setup_logging, write_text


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_table(archive: Path | None, folder: Path, names: list[str]) -> str:
    lines = ["path\tbytes\tsha256"]
    if archive is not None:
        lines.append(f"{archive.name}\t{archive.stat().st_size}\t{sha256(archive)}")
    for name in sorted(names):
        path = folder / name
        lines.append(f"{folder.name}/{name}\t{path.stat().st_size}\t{sha256(path)}")
    return "\n".join(lines) + "\n"


def source_name(source: str, dataset: str, archive: Path) -> str:
    """How errors about the raw files name where they came from (not the extracted copy)."""
    if source == "kaggle":
        return f"Kaggle dataset {DATASET_SLUGS[dataset]} ({archive.name})"
    if source == "synthetic":
        return f"synthetic {archive.name}"
    return str(archive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASET_SLUGS))
    parser.add_argument("--source", required=True, choices=["kaggle", "local", "synthetic"])
    parser.add_argument("--local-dir", default="")
    parser.add_argument("--synthetic", default="{}", help="JSON of data.synthetic")
    parser.add_argument("--extraction", default="{}", help="JSON of data.extraction")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--checksums", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    limits = ExtractionLimits(**json.loads(args.extraction))
    synthetic = json.loads(args.synthetic)

    with tempfile.TemporaryDirectory(
        dir=args.out_dir.parent if args.out_dir.parent.exists() else None
    ) as scratch:
        archive: Path | None = None
        if args.source == "kaggle":
            archive = download_dataset(args.dataset, Path(scratch))
        elif args.source == "synthetic":
            archive = Path(scratch) / f"{args.dataset}.zip"
            if args.dataset == "lgg-mri-segmentation":
                write_lgg_archive(
                    archive,
                    synthetic.get("patients", 12),
                    synthetic.get("slices_per_patient", 16),
                    args.seed,
                )
            else:
                write_btm_archive(archive, synthetic.get("images_per_class", 24), args.seed)
        else:
            if not args.local_dir:
                raise InputError("data.local_dir is required with data.source: local")
            local = Path(args.local_dir)
            zipped, folder = local / f"{args.dataset}.zip", local / args.dataset
            if zipped.is_file():
                archive = zipped
            elif folder.is_dir():
                names = copy_tree(folder, args.out_dir)
                log.info("Copied %d files from %s", len(names), folder)
                names.append(record_source(args.out_dir, str(folder)))
                write_text(args.checksums, checksum_table(None, args.out_dir, names))
                return
            else:
                raise InputError(
                    f"data.local_dir: found neither the archive {zipped} nor an extracted folder "
                    f"{folder}/ (the folder must hold the archives as Kaggle serves them)"
                )
        names = extract_archive(archive, args.out_dir, limits)
        log.info("Extracted %d files from %s into %s", len(names), archive.name, args.out_dir)
        names.append(record_source(args.out_dir, source_name(args.source, args.dataset, archive)))
        write_text(args.checksums, checksum_table(archive, args.out_dir, names))


if __name__ == "__main__":
    run_cli(main)
