"""The quality baseline (issue 17): a plain PyTorch segmentation loop, no workflow recipe.

Trains one U-Net (smp, the given encoder, from scratch) on every segmentation training slice of
a run's preprocessed data (all folds together: the same patients the workflow's fold models
share), Adam at a constant lr, soft Dice loss, random flips, shuffled batches, until a
time budget is spent; then predicts the run's test slices once and scores them with the
workflow's own metrics (tumor-slice Dice, all-slice Dice, per-patient volume Dice). Compare
its JSON with the fold ensemble's test_metrics.json of the same run, given the same seconds:

  python bench/plain_loop.py --run results/cpu --size 64 --seconds 600 --output plain.json

The budget is wall-clock seconds, or (``--clock cpu``) CPU seconds of this process, which stays
fair on a shared machine. ``--budget-from`` takes it from the workflow's own benchmark files:
the sum of their ``cpu_time`` (``--clock cpu``) or ``s`` columns, e.g. the U-Net's fold jobs:

  python bench/plain_loop.py --run results/cpu --size 128 --clock cpu \
      --budget-from results/cpu/benchmarks/segmentation/unet_fold*.tsv --output plain.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainmri.errors import InputError
from brainmri.evaluation.segmentation import overlap_metrics, volume_dice
from brainmri.io import run_cli, setup_logging, write_json
from brainmri.tables import gather, load_table


def load_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{path}: cannot read it as a benchmark TSV ({error})") from None


def as_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear")


def budget_from(files: list[Path], clock: str) -> float:
    """Seconds spent by the jobs of these Snakemake benchmark files (CPU or wall time)."""
    column = "cpu_time" if clock == "cpu" else "s"
    total = 0.0
    for path in files:
        frame = load_tsv(path)
        if column not in frame.columns or frame.empty:
            raise InputError(f"{path}: not a Snakemake benchmark file (no {column!r} column)")
        total += float(frame[column].iloc[-1])
    return total


def train_plain_loop(
    x: torch.Tensor,
    y: torch.Tensor,
    encoder: str,
    seconds: float,
    clock: Callable[[], float],
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 42,
) -> tuple[torch.nn.Module, dict[str, float | int]]:
    """The plain loop: a U-Net from scratch on images ``x`` (N, 3, S, S) in [0, 1] and masks
    ``y`` (N, 1, S, S), Adam at a constant ``lr``, soft Dice, random horizontal flips, shuffled
    batches, until ``seconds`` of ``clock`` are spent (checked before every batch)."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    model = smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=1)
    loss_fn = smp.losses.DiceLoss("binary", from_logits=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start, steps, epochs = clock(), 0, 0
    while clock() - start < seconds:
        model.train()
        for batch in torch.randperm(len(x)).split(batch_size):
            if len(batch) < 2 or clock() - start >= seconds:
                continue
            images, masks = x[batch], y[batch]
            if torch.rand(1) < 0.5:
                images, masks = images.flip(3), masks.flip(3)
            optimizer.zero_grad()
            loss = loss_fn(model(images), masks)
            loss.backward()
            optimizer.step()
            steps += 1
        epochs += 1
    info = {"seconds": round(clock() - start, 1), "epochs_started": epochs, "steps": steps}
    return model.eval(), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, type=Path, help="a run's results folder")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--seconds", type=float, help="training time budget")
    budget.add_argument(
        "--budget-from", nargs="+", type=Path, help="Snakemake benchmark TSVs whose time to sum"
    )
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    log = setup_logging()
    seconds = args.seconds
    if seconds is None:
        seconds = budget_from(args.budget_from, args.clock)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    torch.set_num_threads(args.threads)
    data = args.run / "data"
    table = load_table(data / "manifest.csv", args.run / "splits" / "splits.csv")
    train, test = table[table["seg_split"] == "train"], table[table["seg_split"] == "test"]
    x = as_tensor(gather(data, train), args.size)
    y = torch.nn.functional.interpolate(
        torch.from_numpy(gather(data, train, "masks")).float()[:, None], size=args.size
    )
    model, trained = train_plain_loop(
        x, y, args.encoder, seconds, clock, args.batch_size, args.lr, args.seed
    )
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b) for b in as_tensor(gather(data, test), args.size).split(32)])
    full = gather(data, test, "masks").shape[-1]
    logits = torch.nn.functional.interpolate(logits, size=(full, full), mode="bilinear")
    pred = (logits[:, 0] > 0).numpy()
    truth = gather(data, test, "masks").astype(bool)
    dice, _ = overlap_metrics(pred, truth)
    tumor = test["has_tumor"].to_numpy() == 1
    volume = volume_dice(pred, truth, test["patient"].to_numpy())
    result = {
        "train_slices": len(train),
        "train_patients": int(train["patient"].nunique()),
        "test_slices": len(test),
        "clock": args.clock,
        "budget_seconds": round(seconds, 1),
        "seconds_training": trained["seconds"],
        "epochs_started": trained["epochs_started"],
        "steps": trained["steps"],
        "size": args.size,
        "encoder": args.encoder,
        "dice_tumor_slices": float(dice[tumor].mean()),
        "dice_all_slices": float(dice.mean()),
        "volume_dice": float(volume.mean()),
    }
    write_json(args.output, result)
    log.info("Plain loop: %s", result)


if __name__ == "__main__":
    run_cli(main)
