"""GPU placement on the CPU with fake device counts: one exclusive lock file per GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from helpers import REPO

import brainmri.devices as devices
from brainmri.devices import claim_gpu, release_gpus


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
    fake_gpus(monkeypatch, 1)  # CUDA_VISIBLE_DEVICES=3: one visible device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(devices, "claim_gpu", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert devices.select_device() == torch.device("cuda", 0)


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")


def test_without_a_scheduler_each_job_takes_a_free_gpu(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("BRAINMRI_GPU_LOCK_DIR", str(tmp_path))
    try:
        assert devices.select_device() == torch.device("cuda", 0)
        assert devices.select_device() == torch.device("cuda", 1)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu0.lock", "gpu1.lock"]
    finally:
        release_gpus()
    assert devices.select_device() == torch.device("cuda", 0)  # released locks are reused
    release_gpus()


def test_slots_spread_over_gpus_before_sharing_one():
    assert devices.slot_order(2, 3) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert devices.slot_order(3, 1) == [(0, 0), (1, 0), (2, 0)]


def test_jobs_per_gpu_turns_gpu_resources_into_job_slots(monkeypatch, tmp_path):
    """Two fake GPUs, three jobs each: six jobs get 0,1,0,1,0,1; a seventh waits."""
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("BRAINMRI_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("BRAINMRI_JOBS_PER_GPU", "3")
    try:
        indices = [devices.select_device().index for _ in range(6)]
        assert indices == [0, 1, 0, 1, 0, 1]
        assert len(list(tmp_path.glob("gpu*.lock"))) == 6
        try:
            claim_gpu(2, tmp_path, timeout=0.2, poll=0.05)
        except TimeoutError as error:
            assert "2 (3 job(s) each)" in str(error)
        else:
            raise AssertionError("a seventh job got a slot")
        release_gpus()
        assert devices.select_device().index == 0  # slots are freed with the process's locks
    finally:
        release_gpus()


def test_one_big_gpu_shared_by_jobs_in_separate_processes(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from brainmri.devices import claim_gpu
        print(claim_gpu(1, Path({str(tmp_path)!r}), timeout=30, poll=0.05), flush=True)
        time.sleep(2)
    """)
    env = {**os.environ, "BRAINMRI_JOBS_PER_GPU": "3"}
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    assert [int(p.stdout.readline()) for p in processes] == [0, 0, 0]  # none waited
    for process in processes:
        process.wait(timeout=30)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpu0.lock", "gpu0.slot1.lock", "gpu0.slot2.lock"]


def test_scheduler_visible_devices_win_over_job_slots(monkeypatch):
    fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.setenv("BRAINMRI_JOBS_PER_GPU", "4")
    monkeypatch.setattr(devices, "claim_gpu", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert devices.select_device() == torch.device("cuda", 0)


def test_bad_jobs_per_gpu_is_a_clear_error(monkeypatch):
    for text in ("0", "two"):
        monkeypatch.setenv("BRAINMRI_JOBS_PER_GPU", text)
        try:
            devices.jobs_per_gpu()
        except ValueError as error:
            assert f"BRAINMRI_JOBS_PER_GPU={text!r}" in str(error)
        else:
            raise AssertionError(text)
