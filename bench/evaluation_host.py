"""Time the work of evaluate_segmenter.py after the model has run, on realistic masks:

- ``numpy``: each inference batch's float probabilities cross to the host, are concatenated,
  then ``quantize`` + ``evaluate_split`` there (the path before issue 16; runs against older
  checkouts too);
- ``device``: ``quantize_on`` per inference batch and ``overlap_counts_on`` on ``--device``,
  uint8 to the host, then ``evaluate_split(..., counts=...)`` (HD/ASSD of the slices where both
  masks are non-empty).

Masks: the LGG masks of a preprocessed ``masks.npy`` tiled to ``--slices`` slices; predictions
are each mask shifted by a few pixels (some emptied, some with a false blob), as probabilities
0.9 / 0.1. Prints the best of ``--repeat`` runs of each part, in seconds. Benchmarks measure
speed only; the numbers are not asserted anywhere.

    python bench/evaluation_host.py --masks results/data/lgg/masks.npy --mode numpy
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd


def inputs(masks_path: str, slices: int, seed: int = 0):
    masks = np.load(masks_path, mmap_mode="r")
    truth = np.asarray(masks[np.arange(slices) % len(masks)]).astype(bool)
    rng = np.random.default_rng(seed)
    pred = np.roll(truth, rng.integers(-4, 5, size=2), axis=(1, 2))
    pred[rng.random(slices) < 0.1] = False
    blob = rng.random(slices) < 0.1
    pred[blob, 10:20, 10:20] = True
    probabilities = np.where(pred, 0.9, 0.1).astype(np.float32)
    rows = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(slices)],
            "patient": [f"p{i // 20}" for i in range(slices)],
            "slice_index": np.arange(slices) % 20,
            "has_tumor": truth.reshape(slices, -1).any(1).astype(int),
            "missing_modalities": "",
        }
    )
    return probabilities, truth, rows


def best(function, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--masks", required=True)
    parser.add_argument("--slices", type=int, default=787)
    parser.add_argument("--mode", choices=("numpy", "device"), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="inference batch")
    args = parser.parse_args()
    import torch

    from brainmri.evaluation.segmentation import evaluate_split

    torch.set_num_threads(args.threads)
    probabilities, truth, rows = inputs(args.masks, args.slices)
    device = torch.device(args.device)
    on_device = torch.from_numpy(probabilities).to(device)
    n = len(on_device)
    if args.mode == "numpy":
        from brainmri.evaluation.masks import quantize

        def host_part():
            parts = [on_device[i : i + args.batch].cpu() for i in range(0, n, args.batch)]
            return quantize(torch.cat(parts).numpy())

        quantized, stored = best(host_part, args.repeat)
        scored, _ = best(
            lambda: evaluate_split(rows, stored, truth, 0.5, "test", args.threads), args.repeat
        )
        parts = {"float32 batches to host + quantize": quantized}
    else:
        from brainmri.inference.overlap import overlap_counts_on
        from brainmri.inference.segment import quantize_on

        truth_on = torch.from_numpy(truth).to(device)

        def device_part():
            batches = [on_device[i : i + args.batch] for i in range(0, n, args.batch)]
            stored = torch.cat([quantize_on(batch) for batch in batches])
            return stored.cpu().numpy(), overlap_counts_on(stored, truth_on, 0.5)

        quantized, (stored, counts) = best(device_part, args.repeat)
        scored, _ = best(
            lambda: evaluate_split(rows, stored, truth, 0.5, "test", args.threads, counts=counts),
            args.repeat,
        )
        parts = {"quantize + overlap sums on device, uint8 to host": quantized}
    parts["evaluate_split"] = scored
    parts["total"] = sum(parts.values())
    nonempty = (stored >= 128).reshape(len(truth), -1).any(1)  # 128: stored_cutoff(0.5)
    both = int((nonempty & truth.reshape(len(truth), -1).any(1)).sum())
    print(f"{args.mode} on {device}, {args.slices} slices of {truth.shape[1]} px, {both} pairs")
    for name, seconds in parts.items():
        print(f"  {name}: {seconds:.3f} s")


if __name__ == "__main__":
    main()
