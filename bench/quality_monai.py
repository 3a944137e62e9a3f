"""``kind: monai`` in the quality benchmark (bench/quality.py): the segmentation recipe of
MONAI's 2-D tutorials (``2d_segmentation/torch/unet_training_dict.py``) with the ``monai``
package (bench/requirements-nnunet.txt), at the benchmark's CPU-seconds budget.

MONAI's ``UNet`` (2-D, channels 16-32-64-128-256, strides 2, two residual units per block,
as the tutorial's) on the three channels, ``ScaleIntensityd`` per image, random flips along
both axes, 90-degree rotations, small rotations (up to 15 degrees) and intensity scale / shift
(``RandScaleIntensityd`` / ``RandShiftIntensityd``), ``DiceCELoss`` on the sigmoid, Adam at a
constant 1e-3, shuffled batches; after every epoch ``DiceMetric`` on the inner validation
slices picks the checkpoint (the tutorial's best-metric model). The budget rule is the
recipe's: an epoch starts only while at least half of the last epoch's cost is left.
Inference on the full image (the arrays fit the network), sigmoid, stored uint8.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench import quality_cv as cv
from brainmri.errors import InputError
from brainmri.evaluation.masks import quantize
from brainmri.tables import gather

SETTINGS = {"batch_size": 16, "lr": 1e-3, "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2], "num_res_units": 2}  # fmt: skip
INFERENCE = {"tta": False, "postprocess": {}, "threshold": 0.5}


def available() -> str | None:
    """None when monai can be imported, else why not."""
    try:
        import monai  # noqa: F401
    except ImportError as error:
        return f"monai is not installed (pip install -r bench/requirements-nnunet.txt): {error}"
    return None


def network(settings: dict[str, Any]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=settings["channels"],
                strides=settings["strides"], num_res_units=settings["num_res_units"])  # fmt: skip


def transforms(train: bool, seed: int = 0):
    """The tutorial's dictionary transforms on (3, S, S) images and (1, S, S) labels."""
    from monai import transforms as t

    keys = ["image", "label"]
    steps = [t.ScaleIntensityd(keys="image")]
    if train:
        steps += [
            t.RandFlipd(keys, prob=0.5, spatial_axis=0),
            t.RandFlipd(keys, prob=0.5, spatial_axis=1),
            t.RandRotate90d(keys, prob=0.5, spatial_axes=(0, 1)),
            t.RandRotated(keys, range_x=np.pi / 12, prob=0.5, mode=("bilinear", "nearest")),
            t.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            t.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return t.Compose(steps).set_random_state(seed)


def as_channels_first(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) (ScaleIntensityd then scales each)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)


def _loader(images: np.ndarray, masks: np.ndarray, batch: int, seed: int):
    from monai.data import DataLoader, Dataset

    pairs = zip(images, masks, strict=True)
    items = [{"image": x, "label": y[None].astype(np.float32)} for x, y in pairs]
    generator = torch.Generator().manual_seed(seed)
    dataset = Dataset(items, transforms(True, seed))
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0,
                      generator=generator, drop_last=len(items) > batch)  # fmt: skip


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Float32 tumor probabilities (N, S, S) of uint8 (N, S, S, 3) images, full image."""
    model.eval()
    scale = transforms(False)
    out = []
    for start in range(0, len(images), batch):
        chunk = as_channels_first(images[start : start + batch])
        x = torch.stack([torch.as_tensor(scale({"image": c})["image"]) for c in chunk])
        out.append(torch.sigmoid(model(x.float()))[:, 0].numpy())
    return np.concatenate(out)


def _val_dice(model, images: np.ndarray, masks: np.ndarray) -> float:
    """MONAI's DiceMetric of the thresholded predictions, mean over slices with tumor (it
    ignores slices whose label is empty)."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=True)
    pred = torch.from_numpy(predict(model, images) >= 0.5)[:, None].float()
    metric(pred, torch.from_numpy(masks)[:, None].float())
    value = float(metric.aggregate().item())
    return value if np.isfinite(value) else 0.0


def train(settings: dict[str, Any], data: Path, train_rows: pd.DataFrame,
          val_rows: pd.DataFrame, budget: float, clock: str, seed: int,
          folder: Path) -> dict[str, Any]:  # fmt: skip
    """Train under ``budget`` seconds of ``clock``; the best-metric weights as
    ``<folder>/monai_model.pt``; what it cost."""
    from monai.losses import DiceCELoss

    reason = available()
    if reason:
        raise InputError(reason)
    torch.manual_seed(seed)
    loader = _loader(as_channels_first(gather(data, train_rows)), gather(data, train_rows,
                     "masks"), settings["batch_size"], seed)  # fmt: skip
    val_images, val_masks = gather(data, val_rows), gather(data, val_rows, "masks")
    model = network(settings)
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.Adam(model.parameters(), settings["lr"])
    tick = cv.clock_of(clock)
    start, marks, history = tick(), [], []
    best, best_state = -1.0, copy.deepcopy(model.state_dict())
    while True:
        now = tick() - start
        if marks and budget - now < (now - marks[-1]) / 2:
            break
        marks.append(now)
        model.train()
        losses = []
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        dice = _val_dice(model, val_images, val_masks)
        if dice > best:
            best, best_state = dice, copy.deepcopy(model.state_dict())
        history.append({"epoch": len(marks) - 1, "loss": float(np.mean(losses)),
                        "val_dice": dice, "best": dice == best})  # fmt: skip
    pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
    torch.save({"settings": settings, "state_dict": best_state}, folder / "monai_model.pt")
    chosen = [row["epoch"] for row in history if row["best"]]
    return {"seconds": round(tick() - start, 1), "epochs_run": len(history),
            "best_epoch": chosen[-1], "stopped_by": "budget",
            "train_slices": len(train_rows)}  # fmt: skip


def probabilities(folder: Path, data: Path, rows: pd.DataFrame, flair: bool) -> np.ndarray:
    """Stored uint8 probabilities (N, S, S) of ``rows`` by ``<folder>/monai_model.pt``;
    ``flair``: of their FLAIR-only images."""
    saved = torch.load(folder / "monai_model.pt", map_location="cpu", weights_only=True)
    model = network(saved["settings"])
    model.load_state_dict(saved["state_dict"])
    images = gather(data, rows)
    if flair:
        images = cv.flair_only(images)
    return quantize(predict(model, images))
