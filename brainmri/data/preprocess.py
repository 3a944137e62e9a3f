"""Preprocessing of both datasets to 3-channel PNGs, binary mask PNGs, uint8 arrays and a manifest.

LGG TIFFs are 3-channel (pre-contrast, FLAIR, post-contrast) and stay so; images of the second
dataset are converted to grayscale and copied into 3 channels. Images are resized bilinearly,
masks with nearest neighbour (values 0/255 in the PNG, 0/1 in the array). Every bad input raises
:class:`InputError` naming the file (in the user's archive or folder, when fetch_dataset.py
recorded it) and the problem; outputs appear only when all succeeded. The LGG archive's
duplicate tree is compared, never used (:mod:`brainmri.data.layout`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from brainmri.data.layout import LggSlice, compare_copies, find_lgg_slices, naming_the_source
from brainmri.data.limits import DEFAULT as DEFAULT_LIMITS
from brainmri.data.limits import Limits, check_image, check_volume
from brainmri.errors import InputError
from brainmri.io import atomic_path

log = logging.getLogger(__name__)

BTM_CLASSES = {"glioma": "tumor", "notumor": "no_tumor"}
BTM_SUBSETS = ("Training", "Testing")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
MANIFEST_COLUMNS = [
    "id",
    "source",
    "array_index",
    "patient",
    "institution",
    "slice_index",
    "original_path",
    "image_path",
    "mask_path",
    "label",
    "has_tumor",
    "tumor_area",
    "missing_modalities",
    "btm_class",
    "btm_subset",
    "content_hash",
    "duplicate_group",
]


def open_image(path: Path, limits: Limits = DEFAULT_LIMITS, in_plane: bool = False) -> Image.Image:
    """Open and fully decode an image; a clear InputError for empty, corrupt or non-image files,
    and for images whose header claims more pixels than ``limits.max_image_pixels`` (or, with
    ``in_plane``, a side over ``limits.max_in_plane``), refused before decoding."""
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        image = Image.open(path)
        width, height = image.size
        check_image(path, width, height, limits)
        if in_plane:
            check_volume(path, height, width, 1, len(image.getbands()), limits)
        image.load()
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise InputError(f"{path}: refused as a decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: corrupt or truncated image ({error})") from None
    return image


def to_uint8_gray(image: Image.Image) -> np.ndarray:
    """Any Pillow mode (L, RGB, RGBA, P, I;16, I, F, 1) as a 2-D uint8 grayscale array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            name = getattr(image, "filename", "") or "image"
            raise InputError(f"{name}: {bad} NaN or infinite pixel(s)")
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return np.clip((values - low) * scale, 0, 255).round().astype(np.uint8)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA").convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.uint8)


def square_pad(gray: np.ndarray) -> np.ndarray:
    """Pad a 2-D array with zeros to a centred square."""
    height, width = gray.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    out = np.zeros((side, side), dtype=gray.dtype)
    out[top : top + height, left : left + width] = gray
    return out


def resize_image(array: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of an (H, W) or (H, W, 3) uint8 array to size x size."""
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a 0/1 mask (stays binary)."""
    if mask.shape == (size, size):
        return mask
    resized = Image.fromarray(mask * 255).resize((size, size), Image.NEAREST)
    return (np.asarray(resized) > 127).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _load_lgg_slice(item: LggSlice) -> tuple[np.ndarray, np.ndarray]:
    compare_copies(item)
    image = open_image(item.image)
    if image.mode != "RGB":
        bands = len(image.getbands())
        raise InputError(
            f"{item.image}: expected a 3-channel RGB TIFF (pre-contrast, FLAIR, post-contrast), "
            f"got mode {image.mode} with {bands} channel(s)"
        )
    mask_image = open_image(item.mask)
    if mask_image.size != image.size:
        raise InputError(
            f"{item.mask}: mask size {mask_image.size[0]}x{mask_image.size[1]} differs from its "
            f"image {item.image.name} ({image.size[0]}x{image.size[1]})"
        )
    mask = to_uint8_gray(mask_image) > 127
    return np.asarray(image, dtype=np.uint8), mask.astype(np.uint8)


def _parallel(function: Callable, items: Iterable, threads: int) -> list:
    if threads <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(function, items))


def _missing_modalities(equal_pre: list[bool], equal_post: list[bool], blank: list[bool]) -> str:
    """A modality is missing for a patient when it equals FLAIR on every non-blank slice."""
    informative = [i for i, b in enumerate(blank) if not b]
    if not informative:
        return ""
    missing = []
    if all(equal_pre[i] for i in informative):
        missing.append("pre-contrast")
    if all(equal_post[i] for i in informative):
        missing.append("post-contrast")
    return ";".join(missing)


@contextlib.contextmanager
def _outputs(*paths: Path):
    """Atomic temporaries for several outputs: they are renamed into place together at the end
    of the block (each only if the block succeeded), so a failure leaves none of them."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def preprocess_lgg(
    raw_dir: Path,
    array_size: int,
    png_dir: Path,
    images_path: Path,
    masks_path: Path,
    manifest_path: Path,
    threads: int = 1,
) -> pd.DataFrame:
    """LGG archive folder -> PNGs, images.npy (N,S,S,3), masks.npy (N,S,S) and manifest part."""
    with naming_the_source(raw_dir):
        return _preprocess_lgg(
            raw_dir, array_size, png_dir, images_path, masks_path, manifest_path, threads
        )


def _preprocess_lgg(
    raw_dir: Path,
    array_size: int,
    png_dir: Path,
    images_path: Path,
    masks_path: Path,
    manifest_path: Path,
    threads: int,
) -> pd.DataFrame:
    slices = find_lgg_slices(raw_dir)
    log.info("LGG: %d slices of %d patients", len(slices), len({s.patient for s in slices}))
    images = np.zeros((len(slices), array_size, array_size, 3), dtype=np.uint8)
    masks = np.zeros((len(slices), array_size, array_size), dtype=np.uint8)
    with _outputs(png_dir, images_path, masks_path, manifest_path) as outputs:
        tmp_png, tmp_images, tmp_masks, tmp_manifest = outputs
        (tmp_png / "images").mkdir(parents=True)
        (tmp_png / "masks").mkdir()

        def work(position: int) -> tuple[bool, bool, bool]:
            item = slices[position]
            image, mask = _load_lgg_slice(item)
            flags = (
                bool(np.array_equal(image[..., 0], image[..., 1])),
                bool(np.array_equal(image[..., 2], image[..., 1])),
                bool(image.max() == 0),
            )
            images[position] = resize_image(image, array_size)
            masks[position] = resize_mask(mask, array_size)
            slice_id = f"{item.patient}_{item.index}"
            save_png(images[position], tmp_png / "images" / f"{slice_id}.png")
            save_png(masks[position] * 255, tmp_png / "masks" / f"{slice_id}.png")
            return flags

        flags = _parallel(work, range(len(slices)), threads)
        rows = []
        by_patient: dict[str, list[int]] = {}
        for position, item in enumerate(slices):
            by_patient.setdefault(item.patient, []).append(position)
        missing = {
            patient: _missing_modalities(
                [flags[i][0] for i in positions],
                [flags[i][1] for i in positions],
                [flags[i][2] for i in positions],
            )
            for patient, positions in by_patient.items()
        }
        for position, item in enumerate(slices):
            slice_id = f"{item.patient}_{item.index}"
            area = int(masks[position].sum())
            rows.append(
                {
                    "id": slice_id,
                    "source": "lgg",
                    "array_index": position,
                    "patient": item.patient,
                    "institution": item.institution,
                    "slice_index": item.index,
                    "original_path": item.image.relative_to(raw_dir).as_posix(),
                    "image_path": f"lgg/png/images/{slice_id}.png",
                    "mask_path": f"lgg/png/masks/{slice_id}.png",
                    "label": "tumor" if area else "no_tumor",
                    "has_tumor": int(area > 0),
                    "tumor_area": area,
                    "missing_modalities": missing[item.patient],
                    "btm_class": "",
                    "btm_subset": "",
                    "content_hash": hashlib.sha1(images[position].tobytes()).hexdigest(),
                    "duplicate_group": slice_id,
                }
            )
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        _save_npy(tmp_images, images)
        _save_npy(tmp_masks, masks)
        manifest.to_csv(tmp_manifest, index=False)
    return manifest


def find_btm_images(raw_dir: Path) -> list[tuple[str, str, Path]]:
    """(subset, class, path) of every glioma / notumor image in Training and Testing."""
    found = []
    for subset in BTM_SUBSETS:
        for name in BTM_CLASSES:
            for folder in sorted(raw_dir.glob(f"**/{subset}/{name}")):
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                        found.append((subset, name, path))
    if not found:
        raise InputError(
            f"{raw_dir}: no images found; expected Training/<class>/*.jpg and "
            "Testing/<class>/*.jpg "
            f"with classes {', '.join(BTM_CLASSES)} (is this the brain-tumor-mri-dataset archive?)"
        )
    return found


def preprocess_btm(
    raw_dir: Path,
    array_size: int,
    png_dir: Path,
    images_path: Path,
    manifest_path: Path,
    threads: int = 1,
) -> pd.DataFrame:
    """Second dataset: glioma (tumor) and notumor images -> gray in 3 channels, PNGs, array."""
    with naming_the_source(raw_dir):
        return _preprocess_btm(raw_dir, array_size, png_dir, images_path, manifest_path, threads)


def _preprocess_btm(
    raw_dir: Path,
    array_size: int,
    png_dir: Path,
    images_path: Path,
    manifest_path: Path,
    threads: int,
) -> pd.DataFrame:
    items = find_btm_images(raw_dir)
    log.info("Second dataset: %d glioma/notumor images", len(items))
    images = np.zeros((len(items), array_size, array_size, 3), dtype=np.uint8)
    ids = [
        "btm_" + path.relative_to(raw_dir).with_suffix("").as_posix().replace("/", "_")
        for _, _, path in items
    ]
    with _outputs(png_dir, images_path, manifest_path) as (tmp_png, tmp_images, tmp_manifest):
        (tmp_png / "images").mkdir(parents=True)

        def work(position: int) -> str:
            gray = to_uint8_gray(open_image(items[position][2]))
            digest = hashlib.sha1(np.asarray(gray.shape).tobytes() + gray.tobytes()).hexdigest()
            images[position] = gray_to_rgb(resize_image(square_pad(gray), array_size))
            save_png(images[position], tmp_png / "images" / f"{ids[position]}.png")
            return digest

        hashes = _parallel(work, range(len(items)), threads)
        first_of_hash: dict[str, str] = {}
        rows = []
        for position, ((subset, name, path), digest) in enumerate(zip(items, hashes, strict=True)):
            group = first_of_hash.setdefault(digest, ids[position])
            rows.append(
                {
                    "id": ids[position],
                    "source": "btm",
                    "array_index": position,
                    "patient": path.stem,
                    "institution": "",
                    "slice_index": -1,
                    "original_path": path.relative_to(raw_dir).as_posix(),
                    "image_path": f"btm/png/images/{ids[position]}.png",
                    "mask_path": "",
                    "label": BTM_CLASSES[name],
                    "has_tumor": int(BTM_CLASSES[name] == "tumor"),
                    "tumor_area": -1,
                    "missing_modalities": "",
                    "btm_class": name,
                    "btm_subset": subset,
                    "content_hash": digest,
                    "duplicate_group": group,
                }
            )
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        duplicates = int((manifest["duplicate_group"] != manifest["id"]).sum())
        if duplicates:
            log.info("Second dataset: %d exact duplicate images (kept in one split)", duplicates)
        conflicting = manifest.groupby("duplicate_group")["label"].nunique()
        if (conflicting > 1).any():
            log.warning(
                "Second dataset: %d duplicate groups carry both labels",
                int((conflicting > 1).sum()),
            )
        _save_npy(tmp_images, images)
        manifest.to_csv(tmp_manifest, index=False)
    return manifest


def merge_manifests(parts: list[Path]) -> pd.DataFrame:
    """Concatenate manifest parts; ids must be unique and the columns identical."""
    frames = []
    for part in parts:
        frame = pd.read_csv(part, keep_default_na=False)
        if list(frame.columns) != MANIFEST_COLUMNS:
            raise InputError(f"{part}: unexpected columns {list(frame.columns)}")
        frames.append(frame)
    manifest = pd.concat(frames, ignore_index=True)
    duplicated = manifest["id"][manifest["id"].duplicated()]
    if len(duplicated):
        raise InputError(f"{parts}: duplicate ids, e.g. {duplicated.iloc[0]}")
    return manifest
