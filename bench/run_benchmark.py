"""Performance benchmark of the workflow's own training, inference, preprocessing and metric code.

Measures images/s of the limit (random tensors on the device), of the workflow's fit() on its
data path and of a naive PNG + torchvision loop; where the workflow's epoch time goes; LGG
preprocessing and segmentation-metric throughput. Writes a Markdown table to --output (and
stdout) and the same numbers as JSON beside it. --scaling N ... adds the wall time of the data
stage (and with --scaling-full of the whole demo) through Snakemake for N synthetic patients.

  benchmark.py --output results/bench/benchmark.md
  benchmark.py --output results/bench/scaling.md --scaling 10 20 40 --only-scaling
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a file (`python bench/run_benchmark.py`): the repository root holds bench/ and brainmri/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchmark import (
    REPO,
    TASKS,
    BenchOptions,
    available_cores,
    format_markdown,
    machine_info,
    run_benchmark,
    run_scaling,
)
from brainmri.io import run_cli, setup_logging, write_json, write_text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = BenchOptions()
    parser.add_argument("--output", required=True, type=Path, help="Markdown report (.md)")
    parser.add_argument("--json", type=Path, help="JSON report (default: --output with .json)")
    parser.add_argument("--classifier", default=defaults.classifier, help="timm backbone")
    parser.add_argument("--arch", default=defaults.arch, help="smp architecture")
    parser.add_argument("--encoder", default=defaults.encoder, help="smp encoder")
    parser.add_argument(
        "--image-size", type=int, help="default: the data's size, else 128 (CPU) / 256 (CUDA)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        help="default: 16 (CPU) / 30 (CUDA); more than one: also measured at the others "
        "(e.g. 30 128: the paper's batch and a large one)",
    )
    parser.add_argument(
        "--data-path",
        choices=["auto", "device", "host"],
        default="auto",
        help="auto: as a training job chooses (CUDA: arrays on the GPU if they fit); "
        "device/host: force the device-resident or the host (pinned batches) path",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="throughput loops timed by wall time or by this process's CPU seconds (a shared "
        "machine; with --threads 1)",
    )
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up batches")
    parser.add_argument("--batches", type=int, default=defaults.batches, help="timed batches")
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help="rounds per task (medians reported)"
    )
    parser.add_argument(
        "--threads", type=int, default=available_cores(), help="torch threads, loader workers"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--config", type=Path, default=defaults.config, help="training settings (augmentation...)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="an existing results/.../data folder (default: synthetic)"
    )
    parser.add_argument("--splits", type=Path, help="default: <data-dir>/../splits/splits.csv")
    parser.add_argument(
        "--raw-dir", type=Path, help="raw LGG folder to time preprocessing on (with --data-dir)"
    )
    parser.add_argument("--patients", type=int, default=defaults.patients)
    parser.add_argument("--slices-per-patient", type=int, default=defaults.slices_per_patient)
    parser.add_argument("--images-per-class", type=int, default=defaults.images_per_class)
    parser.add_argument("--metric-slices", type=int, default=defaults.metric_slices)
    parser.add_argument("--scaling", type=int, nargs="+", metavar="N", help="patient counts")
    parser.add_argument("--scaling-full", action="store_true", help="also the whole demo per N")
    parser.add_argument(
        "--scaling-config", type=Path, default=REPO / "config" / "demo.yaml", metavar="YAML"
    )
    parser.add_argument("--only-scaling", action="store_true", help="skip the throughput part")
    parser.add_argument("--workdir", type=Path, help="parent of the temp dirs (default: /tmp)")
    args = parser.parse_args()
    log = setup_logging()
    if args.only_scaling and not args.scaling:
        parser.error("--only-scaling needs --scaling N ...")
    if args.output.suffix != ".md":
        parser.error("--output must end with .md")

    report: dict = {}
    if not args.only_scaling:
        options = BenchOptions(
            classifier=args.classifier,
            arch=args.arch,
            encoder=args.encoder,
            image_size=args.image_size,
            clock=args.clock,
            batch_size=args.batch_size[0] if args.batch_size else None,
            more_batch_sizes=tuple(args.batch_size[1:]) if args.batch_size else (),
            resident={"auto": None, "device": True, "host": False}[args.data_path],
            compile=args.compile,
            warmup=args.warmup,
            batches=args.batches,
            repeats=args.repeats,
            threads=args.threads,
            seed=args.seed,
            device=args.device,
            tasks=tuple(args.tasks),
            naive=not args.no_naive,
            config=args.config,
            data_dir=args.data_dir,
            splits=args.splits,
            raw_dir=args.raw_dir,
            patients=args.patients,
            slices_per_patient=args.slices_per_patient,
            images_per_class=args.images_per_class,
            metric_slices=args.metric_slices,
        )
        report = run_benchmark(options, args.workdir)
    else:
        report["machine"] = machine_info(None, args.threads)
    if args.scaling:
        from brainmri.devices import release_gpus

        release_gpus()  # the Snakemake jobs claim the GPU themselves
        report["scaling_cores"] = args.threads
        report["scaling"] = run_scaling(
            args.scaling, args.scaling_full, args.threads, args.scaling_config, args.workdir
        )
    text = format_markdown(report)
    write_json(args.json or args.output.with_suffix(".json"), report)
    write_text(args.output, text)
    print(text, end="")
    log.info("Wrote %s", args.output)


if __name__ == "__main__":
    run_cli(main)
