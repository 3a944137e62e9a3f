"""Device-side augmentation, training-slice selection, GPU placement, and learning itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import torch
from helpers import REPO

from brainmri.data import Augment, segmentation_training_indices
from brainmri.devices import claim_gpu, release_gpus


def test_augmentation_moves_image_and_mask_together_and_masks_stay_binary():
    images = torch.zeros(4, 3, 32, 32)
    masks = torch.zeros(4, 1, 32, 32)
    images[:, :, 8:14, 4:10] = 1.0
    masks[:, :, 8:14, 4:10] = 1.0
    augment = Augment(rotation_deg=30, shift_fraction=0.1, hflip=True, vflip=True)
    out_images, out_masks = augment(images, masks, torch.Generator().manual_seed(0))
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    # The bright square and the mask land in the same place.
    overlap = ((out_images[:, 0] > 0.5) & (out_masks[:, 0] > 0.5)).sum()
    assert overlap >= 0.8 * (out_masks > 0.5).sum()
    again = augment(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_masks)


def test_intensity_augmentation_touches_images_only():
    images = torch.rand(3, 3, 16, 16)
    masks = (torch.rand(3, 1, 16, 16) > 0.5).float()
    out_images, out_masks = Augment(brightness=0.2, contrast=0.2)(
        images, masks, torch.Generator().manual_seed(1)
    )
    assert torch.equal(out_masks, masks)
    assert not torch.equal(out_images, images) and out_images.min() >= 0 and out_images.max() <= 1


def test_training_slice_selection():
    has_tumor = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    generator = torch.Generator().manual_seed(0)
    chosen = segmentation_training_indices(has_tumor, "tumor_plus_empty", 0.5, generator)
    assert sorted(i for i in chosen if has_tumor[i]) == [0, 1, 2, 3]
    assert sum(1 for i in chosen if not has_tumor[i]) == 2
    assert sorted(segmentation_training_indices(has_tumor, "tumor_only", 0, generator)) == [
        0,
        1,
        2,
        3,
    ]
    assert len(segmentation_training_indices(has_tumor, "all", 0, generator)) == 12


def test_concurrent_jobs_claim_distinct_gpus(tmp_path):
    """Fake device counts on the CPU: jobs holding locks get distinct indices."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from brainmri.devices import claim_gpu
        print(claim_gpu(3, Path({str(tmp_path)!r}), timeout=30, poll=0.05), flush=True)
        time.sleep(3)
    """)
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    indices = sorted(int(p.stdout.readline()) for p in processes)
    assert indices == [0, 1, 2]
    for process in processes:
        process.wait(timeout=30)
    # All released at exit: a new claim gets GPU 0 again.
    assert claim_gpu(3, tmp_path, timeout=5) == 0
    assert claim_gpu(3, tmp_path, timeout=5) == 1  # this process now holds 0 and 1
    release_gpus()
    assert claim_gpu(3, tmp_path, timeout=5) == 0
    release_gpus()


def test_all_gpus_taken_waits_then_times_out(tmp_path):
    assert claim_gpu(1, tmp_path, timeout=5) == 0
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
        f"from brainmri.devices import claim_gpu; claim_gpu(1, Path({str(tmp_path)!r}), "
        "timeout=1, poll=0.1)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "no free GPU" in result.stderr
    release_gpus()


def test_scheduler_visible_devices_skip_the_locks(monkeypatch):
    import brainmri.devices as devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(devices, "claim_gpu", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert devices.select_device() == torch.device("cuda", 0)
