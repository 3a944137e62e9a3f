"""The fast data path: uint8 arrays loaded once per job, batched augmentation on the device.

Images stay uint8 (N, S, S, 3) in memory (memory-mapped ``.npy`` files written by
preprocessing) until a batch is gathered, pinned (the plan's ``pin_memory``), moved with
``non_blocking`` and turned into float [0, 1] on the device. Where the accelerator plan says so
the whole uint8 arrays of a job are put on the device once (:func:`make_resident`); batches are
then gathered there too. Augmentation is one ``affine_grid`` + ``grid_sample`` per batch, its
parameters drawn from a seeded generator on the host and sent in one pinned non-blocking copy,
so it costs little next to a training step, never waits for the device, and is identical
whether a job ran straight through or was resumed.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from brainmri.accelerator import AcceleratorPlan

log = logging.getLogger(__name__)


@dataclass
class Augment:
    """Batched random geometry (+ intensity for segmentation), identical for image and mask."""

    rotation_deg: float = 0.0
    shift_fraction: float = 0.0
    hflip: bool = False
    vflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0

    @classmethod
    def from_settings(cls, settings: dict) -> Augment:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in (settings.get("augment") or {}).items() if k in fields})

    def __call__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        generator: torch.Generator,
        pin: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch; the per-batch parameters go to the device in one copy (``pin``:
        from pinned memory, non-blocking, so the host never waits for the device)."""
        batch = images.shape[0]
        draw = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        angle = (draw(batch) * 2 - 1) * math.radians(self.rotation_deg)
        shift = (draw(batch, 2) * 2 - 1) * 2 * self.shift_fraction
        flip_x = torch.where((draw(batch) < 0.5) & self.hflip, -1.0, 1.0)
        flip_y = torch.where((draw(batch) < 0.5) & self.vflip, -1.0, 1.0)
        bright = (draw(batch) * 2 - 1) * self.brightness
        contrast = 1 + (draw(batch) * 2 - 1) * self.contrast
        drawn = torch.stack([angle, shift[:, 0], shift[:, 1], flip_x, flip_y, bright, contrast])
        angle, shift_x, shift_y, flip_x, flip_y, bright, contrast = host_to_device(
            drawn, images.device, pin
        ).unbind()
        if self.rotation_deg or self.shift_fraction or self.hflip or self.vflip:
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta = torch.stack(
                [
                    torch.stack([cos * flip_x, -sin * flip_y, shift_x], dim=1),
                    torch.stack([sin * flip_x, cos * flip_y, shift_y], dim=1),
                ],
                dim=1,
            ).to(images.dtype)
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", align_corners=False)
            if masks is not None:
                masks = F.grid_sample(masks, grid, mode="nearest", align_corners=False)
        if self.brightness or self.contrast:
            view = (batch, 1, 1, 1)
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            contrast = contrast.view(view)
            bright = bright.view(view)
            images = ((images - mean) * contrast + mean + bright).clamp(0, 1)
        return images, masks


def to_device(
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    size: int,
    channels_last: bool = False,
    pin: bool = False,
) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, size, size) in [0, 1] on ``device``.

    A NumPy batch is copied (``pin``: from pinned memory, non-blocking); a tensor already on
    the device is used as is.
    """
    tensor = _on_device(images, device, pin)
    tensor = tensor.permute(0, 3, 1, 2).float().div_(255)
    if tensor.shape[-1] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def targets_to_device(
    targets: np.ndarray | torch.Tensor, device: torch.device, size: int, pin: bool = False
) -> torch.Tensor:
    """Labels (B,) -> long; masks (B, S, S) uint8 0/1 -> float (B, 1, size, size)."""
    tensor = _on_device(targets, device, pin)
    if tensor.ndim == 1:
        return tensor.long()
    tensor = tensor.unsqueeze(1).float()
    if tensor.shape[-1] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="nearest")
    return tensor


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked host memory (a seam: the CPU tests stub it)."""
    return tensor.pin_memory()


def host_to_device(tensor: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """A host tensor on ``device``: pinned and non-blocking with ``pin``, else a plain copy
    (nothing on the CPU)."""
    if pin:
        return pinned(tensor).to(device, non_blocking=True)
    return tensor.to(device)


def _on_device(array: np.ndarray | torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device, non_blocking=True)
    return host_to_device(torch.from_numpy(np.ascontiguousarray(array)), device, pin)


def resident_fits(
    nbytes: int, plan: AcceleratorPlan, share: float | None = None
) -> tuple[bool, int]:
    """Whether ``nbytes`` fit the device for ``plan``: at most ``share`` (default the plan's
    ``memory_share``, already divided among the job slots of a GPU) of its total memory and
    no more than is free now; and the free bytes. Not on a CUDA plan: always."""
    if not plan.cuda:
        return True, 0
    free, total = torch.cuda.mem_get_info(plan.device)
    share = plan.memory_share if share is None else share
    return nbytes <= min(share * total, free), int(free)


def make_resident(
    arrays: list[np.ndarray],
    plan: AcceleratorPlan,
    what: str = "data",
    share: float | None = None,
    decided: bool = False,
) -> list[np.ndarray | torch.Tensor]:
    """The job's uint8 arrays as tensors on the plan's device when they fit (gathered,
    augmented and normalised there, no host work per batch; ``decided``: the caller already
    checked, see brainmri.training.setup); else as they are, for the host path (background
    gather, pinned batches), with a log line saying why."""
    nbytes = sum(int(np.asarray(a).nbytes) for a in arrays)
    fits, free = (True, 0) if decided else resident_fits(nbytes, plan, share)
    if not fits:
        log.info(
            "%s: %.2f GB do not fit the job's %.0f %% of the memory of %s (%.2f GB free): "
            "pinned host batches",
            what,
            nbytes / 1e9,
            100 * (plan.memory_share if share is None else share),
            plan.device,
            free / 1e9,
        )
        return list(arrays)
    # np.require copies only read-only or strided arrays (torch wants writable memory).
    device = plan.device
    tensors = [torch.from_numpy(np.require(a, requirements="CW")).to(device) for a in arrays]
    if plan.cuda:
        log.info("%s: %.2f GB resident on %s", what, nbytes / 1e9, device)
    return tensors


class Batches:
    """Batches of (images, targets) on the device for one pass, optionally shuffled/augmented.

    ``images``/``targets`` are NumPy arrays (host path: a background thread gathers the next
    uint8 batch while the model works on the current one) or tensors already on the device
    (resident path, :func:`make_resident`: gathered with ``index_select`` on the device).
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        targets: np.ndarray | torch.Tensor,
        batch_size: int,
        device: torch.device,
        size: int,
        augment: Augment | None = None,
        channels_last: bool = False,
        pin: bool = False,
    ) -> None:
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images, self.targets = images, targets
        self.batch_size, self.device, self.size = batch_size, device, size
        self.augment, self.channels_last, self.pin = augment, channels_last, pin

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resident(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    def epoch(
        self,
        indices: np.ndarray | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over ``indices`` (default: all, in order) in batches (default: the batch size
        given at construction).

        With a ``generator`` (training) the batches are augmented, and a last batch of one
        image joins the batch before it.
        """
        if indices is None:
            indices = np.arange(len(self.images))
        step = batch_size or self.batch_size
        chunks = [np.sort(indices[i : i + step]) for i in range(0, len(indices), step)]
        if generator is not None and len(chunks) > 1 and len(chunks[-1]) == 1:
            # A training batch of one breaks batch norm (e.g. DeepLabV3+'s ASPP pooling).
            chunks[-2:] = [np.sort(np.concatenate(chunks[-2:]))]
        if self.resident:
            raw = (_gather_resident(self.images, self.targets, c, self.pin) for c in chunks)
        else:
            raw = _prefetch(self.images, self.targets, chunks)
        for raw_images, raw_targets in raw:
            images = to_device(raw_images, self.device, self.size, pin=self.pin)
            targets = targets_to_device(raw_targets, self.device, self.size, self.pin)
            if self.augment is not None and generator is not None:
                masks = targets if targets.ndim == 4 else None
                images, masks = self.augment(images, masks, generator, self.pin)
                if masks is not None:
                    targets = masks
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, targets


def _gather_resident(
    images: torch.Tensor, targets: torch.Tensor, chunk: np.ndarray, pin: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    index = host_to_device(torch.from_numpy(chunk), images.device, pin)
    return images.index_select(0, index), targets.index_select(0, index)


def _prefetch(
    images: np.ndarray, targets: np.ndarray, chunks: list[np.ndarray], depth: int = 2
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Gather batches in a background thread (NumPy copies release the GIL)."""
    if len(chunks) <= 1:
        for chunk in chunks:
            yield images[chunk], targets[chunk]
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        for chunk in chunks:
            if stop.is_set():
                return
            buffer.put((images[chunk], targets[chunk]))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        for _ in chunks:
            yield buffer.get()
    finally:
        stop.set()
        while thread.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


def segmentation_training_indices(
    has_tumor: np.ndarray,
    mode: str,
    empty_fraction: float,
    generator: torch.Generator,
    tumor_area: np.ndarray | None = None,
    patients: np.ndarray | None = None,
) -> np.ndarray:
    """Training slices of one epoch: all, tumor only, tumor + a fresh draw of empty ones, or
    (``area_weighted``, needs ``tumor_area`` and ``patients``) as many slices as
    ``tumor_plus_empty`` takes, drawn with replacement by :func:`area_weighted_indices`."""
    tumor = np.flatnonzero(has_tumor)
    empty = np.flatnonzero(~has_tumor.astype(bool))
    n_empty = min(len(empty), round(empty_fraction * len(tumor)))
    if mode == "area_weighted":
        if tumor_area is None or patients is None:
            raise ValueError("segmentation.train_slices area_weighted: needs areas and patients")
        count = len(tumor) + n_empty if len(tumor) else len(has_tumor)
        return area_weighted_indices(tumor_area, patients, count, generator)
    if mode == "all" or len(tumor) == 0:
        chosen = np.arange(len(has_tumor))
    elif mode == "tumor_only":
        chosen = tumor
    elif mode == "tumor_plus_empty":
        pick = torch.randperm(len(empty), generator=generator)[:n_empty].numpy()
        chosen = np.concatenate([tumor, empty[pick]])
    else:
        raise ValueError(f"segmentation.train_slices: unknown mode {mode!r}")
    order = torch.randperm(len(chosen), generator=generator).numpy()
    return chosen[order]


def area_weights(tumor_area: np.ndarray) -> np.ndarray:
    """Buda et al.'s slice probabilities within one volume: the tumor area plus a 10 % share
    spread uniformly, ``(area + 0.1 * total / n) / (1.1 * total)``; uniform without tumor."""
    area = np.asarray(tumor_area, dtype=np.float64)
    total = area.sum()
    if total <= 0:
        return np.full(len(area), 1.0 / len(area))
    return (area + 0.1 * total / len(area)) / (1.1 * total)


def area_weighted_indices(
    tumor_area: np.ndarray, patients: np.ndarray, count: int, generator: torch.Generator
) -> np.ndarray:
    """``count`` slices drawn with replacement as Buda et al. sample (brain-segmentation-pytorch,
    dataset.py): each a patient uniformly, then one of its slices by :func:`area_weights`.
    Drawn from ``generator`` only (same generator state, same slices)."""
    _, patient_of = np.unique(np.asarray(patients), return_inverse=True)
    n_patients = int(patient_of.max()) + 1
    drawn_patient = torch.randint(n_patients, (count,), generator=generator).numpy()
    uniform = torch.rand(count, generator=generator, dtype=torch.float64).numpy()
    chosen = np.empty(count, dtype=np.int64)
    for patient in range(n_patients):
        members = np.flatnonzero(patient_of == patient)
        cumulative = np.cumsum(area_weights(np.asarray(tumor_area)[members]))
        mine = drawn_patient == patient
        position = np.searchsorted(cumulative / cumulative[-1], uniform[mine], side="right")
        chosen[mine] = members[np.minimum(position, len(members) - 1)]
    return chosen
