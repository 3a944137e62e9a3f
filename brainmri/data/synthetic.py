"""Synthetic stand-ins for the two Kaggle archives, in exactly their layout.

LGG (``lgg-mri-segmentation.zip``): ``kaggle_3m/TCGA_<inst>_<id>_<date>/..._<n>.tif`` RGB slices
(pre-contrast, FLAIR, post-contrast) with ``..._<n>_mask.tif`` (0/255), the whole tree repeated
under ``lgg-mri-segmentation/kaggle_3m/`` as in the real archive. Second dataset
(``brain-tumor-mri-dataset.zip``): ``Training|Testing/<class>/T?-xx_NNNN.jpg``.

The anatomy is an elliptical head with brain texture; tumors are bright FLAIR blobs spanning a
contiguous range of slices, so that a model can learn them. Everything is drawn from the seed and
the zip files are byte-identical for the same arguments.
"""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")
BTM_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
BTM_CODES = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
ZIP_DATE = (2020, 1, 1, 0, 0, 0)
LGG_SIZE = 256


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="xy")


def _smooth_noise(rng: np.random.Generator, size: int, scale: int = 8) -> np.ndarray:
    """Low-frequency texture in [0, 1]: coarse noise upsampled bilinearly."""
    coarse = rng.random((scale, scale)).astype(np.float32)
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def _blob(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, rng) -> np.ndarray:
    """A lumpy disc: radius modulated by a few angular harmonics."""
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6.28)))
    radius *= 1 + 0.1 * np.cos(5 * angle + rng.uniform(0, 6.28))
    return np.hypot(xx - cx, yy - cy) < radius


def brain_slice(
    rng: np.random.Generator,
    size: int,
    position: float,
    tumor: tuple[float, float, float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One slice: (H, W, 3) uint8 image (pre-contrast, FLAIR, post-contrast) and (H, W) bool mask.

    ``position`` in [0, 1] runs through the head (slices near the ends are smaller);
    ``tumor`` is (cx, cy, radius) in [-1, 1] units, or None.
    """
    xx, yy = _grid(size)
    extent = 0.35 + 0.6 * np.sin(np.pi * np.clip(position, 0.02, 0.98))
    head = (xx / (0.8 * extent)) ** 2 + (yy / (0.95 * extent)) ** 2 < 1
    brain = (xx / (0.72 * extent)) ** 2 + (yy / (0.86 * extent)) ** 2 < 1
    texture = _smooth_noise(rng, size, 12)
    ventricles = (np.abs(xx) < 0.08 * extent) & (np.abs(yy) < 0.3 * extent)
    base = np.where(brain, 0.45 + 0.25 * texture, 0.0) + np.where(head & ~brain, 0.85, 0.0)
    base = np.where(ventricles & brain, 0.2, base)
    mask = np.zeros((size, size), dtype=bool)
    if tumor is not None:
        cx, cy, r = tumor
        mask = _blob(xx, yy, cx * extent, cy * extent, r * extent, rng) & brain
    pre = base * 0.8
    flair = np.where(ventricles & brain, 0.1, base)
    flair = np.where(mask, 0.95, flair)
    edema = np.zeros_like(mask)
    if tumor is not None:
        edema = _blob(xx, yy, tumor[0] * extent, tumor[1] * extent, tumor[2] * 1.4 * extent, rng)
        flair = np.where(edema & brain & ~mask, np.maximum(flair, 0.75), flair)
    post = np.where(mask, 0.9 * base + 0.3, base * 0.9)
    channels = np.stack([pre, flair, post], axis=-1)
    channels += rng.normal(0, 0.03, channels.shape).astype(np.float32)
    channels = np.where(head[..., None], channels, 0.0)
    image = np.clip(channels * 255, 0, 255).astype(np.uint8)
    return image, mask


def _tif_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    archive.writestr(info, data)


def write_lgg_archive(
    path: Path, patients: int, slices_per_patient: int, seed: int, size: int = LGG_SIZE
) -> None:
    """Write a synthetic ``lgg-mri-segmentation.zip`` (both copies of ``kaggle_3m``)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        _write_lgg_members(archive, patients, slices_per_patient, rng, size)


def _write_lgg_members(
    archive: zipfile.ZipFile,
    patients: int,
    slices_per_patient: int,
    rng: np.random.Generator,
    size: int,
) -> None:
    def add(name: str, data: bytes) -> None:
        # Streamed member by member (memory stays flat), each under both roots.
        for prefix in ("", "lgg-mri-segmentation/"):
            _add(archive, prefix + name, data)

    csv_rows = ["Patient,RNASeqCluster,MethylationCluster,death01"]
    for p in range(patients):
        inst = INSTITUTIONS[p % len(INSTITUTIONS)]
        folder = f"TCGA_{inst}_{1000 + 37 * p:04d}_{19950101 + 311 * p}"
        csv_rows.append(f"TCGA_{inst}_{1000 + 37 * p:04d},{p % 4 + 1},{p % 5 + 1},{p % 2}")
        n = slices_per_patient + int(rng.integers(0, 4))
        # ~1/3 of the slices carry a tumor, in one contiguous stretch of the volume.
        length = max(1, round(n * rng.uniform(0.25, 0.45)))
        start = int(rng.integers(n // 5, max(n // 5 + 1, n - length - n // 6)))
        cx, cy = rng.uniform(-0.35, 0.35, 2)
        radius = rng.uniform(0.12, 0.25)
        missing = {0: "pre", 3: "post"}.get(p % 7)  # a few cases lack a modality
        for s in range(n):
            position = (s + 0.5) / n
            tumor = None
            if start <= s < start + length:
                phase = (s - start + 0.5) / length
                tumor = (cx, cy, radius * (0.5 + 0.5 * np.sin(np.pi * phase)))
            image, mask = brain_slice(rng, size, position, tumor)
            if missing == "pre":
                image[..., 0] = image[..., 1]
            elif missing == "post":
                image[..., 2] = image[..., 1]
            stem = f"{folder}_{s + 1}"
            add(f"kaggle_3m/{folder}/{stem}.tif", _tif_bytes(image))
            mask_u8 = (mask * 255).astype(np.uint8)
            add(f"kaggle_3m/{folder}/{stem}_mask.tif", _tif_bytes(mask_u8))
    add("kaggle_3m/README.md", b"Synthetic stand-in for the LGG dataset (brainmri.synthetic).\n")
    add("kaggle_3m/data.csv", ("\n".join(csv_rows) + "\n").encode())


def btm_image(rng: np.random.Generator, label: str) -> Image.Image:
    """One image of the second dataset: grayscale or RGB JPG of varying size."""
    size = int(rng.choice([192, 224, 256, 300]))
    tumor = None
    if label != "notumor":
        tumor = (*rng.uniform(-0.4, 0.4, 2), rng.uniform(0.1, 0.22))
    image, _ = brain_slice(rng, size, rng.uniform(0.3, 0.7), tumor)
    gray = image[..., 1]  # FLAIR-like contrast
    if rng.random() < 0.5:
        return Image.fromarray(gray, mode="L")
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), mode="RGB")


def write_btm_archive(path: Path, images_per_class: int, seed: int) -> None:
    """Write a synthetic ``brain-tumor-mri-dataset.zip`` (Training 3/4, Testing 1/4)."""
    rng = np.random.default_rng(seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_test = max(1, images_per_class // 4)
    with zipfile.ZipFile(path, "w") as archive:
        for label in BTM_CLASSES:
            data = b""
            for i in range(images_per_class):
                subset, prefix = ("Testing", "Te") if i < n_test else ("Training", "Tr")
                # The real dataset holds exact duplicates: the last image repeats the one before.
                if i < images_per_class - 1 or images_per_class < 3:
                    buffer = io.BytesIO()
                    btm_image(rng, label).save(buffer, format="JPEG", quality=90)
                    data = buffer.getvalue()
                name = f"{subset}/{label}/{prefix}-{BTM_CODES[label]}_{i:04d}.jpg"
                _add(archive, name, data)
