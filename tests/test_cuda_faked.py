"""The CUDA device code run on the CPU with CUDA faked (issue 22, items 1-4 and 11): several
visible devices, the per-user lock folder and an unwritable lock file, a resume state saved on a
4-GPU machine resumed on one GPU, an empty grad-scaler state resumed where the scaler is on, a
driver CUDA cannot use."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO
from torch import nn

import brainmri.devices as devices
from brainmri.devices import release_gpus
from brainmri.errors import InputError
from brainmri.io import run_cli
from brainmri.models import safe_torch_load
from brainmri.training import resume
from brainmri.training.loop import FitSettings, accuracy_per_sample, fit

OLD_DRIVER = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
NEW_DRIVER = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.82.07  Release Build  "
    "(dvs-builder@U16-I2-C03-12-3)  Fri Aug 29 00:44:12 UTC 2025\n"
)


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")


@pytest.fixture
def locks(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINMRI_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("BRAINMRI_DEVICE", raising=False)
    yield tmp_path / "locks"
    release_gpus()


# --- item 1: jobs spread over the devices CUDA_VISIBLE_DEVICES names ---------------------------


def test_visible_devices_are_shared_out_by_job_slots(monkeypatch, locks):
    """CUDA_VISIBLE_DEVICES=0,1 with two slots per device: four jobs on 0,1,0,1, a fifth waits."""
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("BRAINMRI_JOBS_PER_GPU", "2")
    assert [devices.select_device().index for _ in range(4)] == [0, 1, 0, 1]
    names = sorted(path.name for path in locks.iterdir())
    assert names == ["gpu0.lock", "gpu0.slot1.lock", "gpu1.lock", "gpu1.slot1.lock"]
    with pytest.raises(TimeoutError, match=r"2 \(2 job\(s\) each\)"):
        devices.claim_gpu(2, locks, timeout=0.2, poll=0.05, keys=devices.lock_keys(2))


def test_locks_name_the_physical_card_not_the_visible_index(monkeypatch, locks):
    """CUDA_VISIBLE_DEVICES=2,3: cuda:0 and cuda:1 are cards 2 and 3 (UUIDs where CUDA has them),
    so a second workflow with CUDA_VISIBLE_DEVICES=3 would lock card 3 by the same name."""
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [devices.select_device().index for _ in range(2)] == [0, 1]
    assert sorted(path.name for path in locks.iterdir()) == ["gpu2.lock", "gpu3.lock"]
    release_gpus()
    uuids = {0: "5e0b6b4c-0000-4000-8000-00000000000a", 1: "5e0b6b4c-0000-4000-8000-00000000000b"}
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=uuids[i])
    )
    assert devices.lock_keys(2) == [f"-{uuids[0]}", f"-{uuids[1]}"]
    assert devices.select_device().index == 0
    assert (locks / f"gpu-{uuids[0]}.lock").is_file()


def test_visible_devices_are_read_as_cuda_reads_them(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.visible_devices() is None
    for text, expected in (
        ("0,1", ["0", "1"]), (" 2 , 3", ["2", "3"]), ("GPU-8f3a,MIG-1c", ["GPU-8f3a", "MIG-1c"]),
        ("0,x,1", ["0"]), ("", []), ("-1", []), ("NoDevFiles", []),
    ):  # fmt: skip
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", text)
        assert devices.visible_devices() == expected, text


def test_one_visible_device_is_shared_by_every_job(monkeypatch, locks):
    """SLURM's one GPU per job: every slot uses it, no lock is taken."""
    fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.setenv("BRAINMRI_JOBS_PER_GPU", "4")
    assert [devices.select_device().index for _ in range(6)] == [0] * 6
    assert not locks.exists()


def test_jobs_in_separate_processes_spread_over_visible_devices(tmp_path):
    """Three processes, CUDA_VISIBLE_DEVICES=0,1,2 (faked): three different cuda:N."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import torch
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 3
        torch.cuda.set_device = lambda device: None
        torch.cuda.get_device_name = lambda device: "Fake GPU"
        from brainmri.devices import select_device
        print(select_device().index, flush=True)
        time.sleep(3)
    """)
    env = {
        **os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2", "BRAINMRI_GPU_LOCK_DIR": str(tmp_path),
        "BRAINMRI_JOBS_PER_GPU": "1",
    }  # fmt: skip
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    try:
        assert sorted(int(process.stdout.readline()) for process in processes) == [0, 1, 2]
    finally:
        for process in processes:
            process.wait(timeout=60)


# --- item 2: a per-user lock folder; an unusable lock file is one clear error -----------------


def test_lock_folder_is_per_user_and_ignores_tmpdir(monkeypatch, tmp_path):
    monkeypatch.delenv("BRAINMRI_GPU_LOCK_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert devices.lock_dir() == Path("/tmp") / f"brainmri-gpu-locks-{os.getuid()}"
    monkeypatch.setattr(os, "getuid", lambda: 4321)
    assert devices.lock_dir() == Path("/tmp") / "brainmri-gpu-locks-4321"


def test_lock_folder_and_files_are_private(monkeypatch, tmp_path):
    monkeypatch.delenv("BRAINMRI_GPU_LOCK_DIR", raising=False)
    monkeypatch.setattr(devices, "LOCK_ROOT", tmp_path)
    previous = os.umask(0o022)  # the first user's umask
    try:
        assert devices.claim_gpu(1, timeout=1) == 0
    finally:
        os.umask(previous)
        release_gpus()
    folder = tmp_path / f"brainmri-gpu-locks-{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "gpu0.lock").stat().st_mode & 0o777 == 0o600


def test_a_lock_folder_of_another_user_is_refused(monkeypatch, tmp_path):
    """Someone else made /tmp/brainmri-gpu-locks-<my uid> (or a symlink there): a clear error,
    not lock files in their folder."""
    monkeypatch.delenv("BRAINMRI_GPU_LOCK_DIR", raising=False)
    monkeypatch.setattr(devices, "LOCK_ROOT", tmp_path)
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1000)
    (tmp_path / f"brainmri-gpu-locks-{owner + 1000}").mkdir()
    with pytest.raises(devices.DeviceError, match="not a folder of this user"):
        devices.claim_gpu(1, timeout=1)
    monkeypatch.setattr(os, "getuid", lambda: owner + 2000)
    (tmp_path / f"brainmri-gpu-locks-{owner + 2000}").symlink_to(tmp_path)
    with pytest.raises(devices.DeviceError, match="BRAINMRI_GPU_LOCK_DIR"):
        devices.claim_gpu(1, timeout=1)


def test_an_unwritable_lock_file_is_one_clear_error(monkeypatch, locks, capsys):
    """Root ignores file modes, so the second user's PermissionError is simulated."""
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def refuse_builtin(path, *args, **kwargs):  # what the code before the fix used
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(devices, "open", refuse_builtin, raising=False)
    with pytest.raises(InputError) as caught:
        devices.claim_gpu(2, timeout=1)
    message = str(caught.value)
    assert str(locks / "gpu0.lock") in message and "Permission denied" in message
    assert "set BRAINMRI_GPU_LOCK_DIR" in message and "\n" not in message
    with pytest.raises(SystemExit) as stop:  # a workflow script: one line, exit status 1
        run_cli(lambda: devices.claim_gpu(2, timeout=1))
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("error (DeviceError): ")


def test_a_lock_folder_without_flock_is_one_clear_error(monkeypatch, locks):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(devices.fcntl, "flock", no_locks)
    with pytest.raises(InputError, match=r"gpu0.lock: cannot lock .*No locks available.*local"):
        devices.claim_gpu(1, timeout=1)


def test_an_unwritable_lock_folder_is_one_clear_error(monkeypatch, tmp_path):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setenv("BRAINMRI_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(InputError, match=r"cannot create the GPU lock folder \(Permission denied"):
        devices.claim_gpu(1, timeout=1)


# --- item 11: a driver CUDA cannot use stops a GPU job instead of training on the CPU ----------


@pytest.fixture
def no_cuda(monkeypatch, tmp_path):
    """A CUDA 13 build of torch where CUDA does not work; returns the driver version file."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for name in ("CUDA_VISIBLE_DEVICES", "BRAINMRI_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "nvidia-version"


def test_an_old_driver_is_one_clear_error(no_cuda, capsys):
    no_cuda.write_text(OLD_DRIVER)
    with pytest.raises(InputError) as caught:
        devices.select_device(version_file=no_cuda)
    message = str(caught.value)
    assert "built for CUDA 13.0" in message and "NVIDIA driver >= 580.65.06" in message
    assert f"found NVIDIA driver 535.104.05 ({no_cuda})" in message
    assert "install an NVIDIA driver >= 580.65.06" in message and "older CUDA" not in message
    assert "a torch build for the CUDA version your driver supports" in message
    assert "`device: cpu`" in message and "\n" not in message
    with pytest.raises(SystemExit):
        run_cli(lambda: devices.select_device(version_file=no_cuda))
    assert capsys.readouterr().err.startswith("error (DeviceError): CUDA is unusable")


def test_a_recent_driver_without_cuda_points_at_the_devices(no_cuda):
    no_cuda.write_text(NEW_DRIVER)
    with pytest.raises(
        devices.DeviceError, match=r"found NVIDIA driver 580\.82\.07 .*recent enough"
    ):
        devices.select_device(version_file=no_cuda)


def test_visible_devices_without_a_driver_run_auto_on_the_cpu(no_cuda, monkeypatch):
    """A scheduler's GRES sets CUDA_VISIBLE_DEVICES on nodes without a driver too (the SLURM
    test cluster does): with no driver at all, ``auto`` is the CPU; ``cuda`` is an error."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert devices.select_device(version_file=no_cuda).type == "cpu"
    monkeypatch.setenv("BRAINMRI_DEVICE", "cuda")
    with pytest.raises(devices.DeviceError, match="found no NVIDIA driver"):
        devices.select_device(version_file=no_cuda)


def test_no_driver_at_all_runs_auto_on_the_cpu(no_cuda, caplog):
    caplog.set_level("INFO")
    assert devices.select_device(version_file=no_cuda) == torch.device("cpu")
    assert "Device: CPU (no CUDA device)" in caplog.text


def test_hidden_devices_or_a_cpu_build_run_auto_on_the_cpu(no_cuda, monkeypatch):
    no_cuda.write_text(OLD_DRIVER)
    for hidden in ("", "-1", "NoDevFiles"):  # "": what the tests do to force the CPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert devices.select_device(version_file=no_cuda) == torch.device("cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert devices.select_device(version_file=no_cuda) == torch.device("cpu")


def test_device_cpu_and_device_cuda_are_obeyed(no_cuda, monkeypatch, locks):
    monkeypatch.setenv("BRAINMRI_DEVICE", "cuda")
    with pytest.raises(devices.DeviceError, match="found no NVIDIA driver"):
        devices.select_device(version_file=no_cuda)
    monkeypatch.setenv("BRAINMRI_DEVICE", "cpu")
    no_cuda.write_text(OLD_DRIVER)
    assert devices.select_device(version_file=no_cuda) == torch.device("cpu")
    fake_gpus(monkeypatch, 2)  # even with a working GPU
    assert devices.select_device(version_file=no_cuda) == torch.device("cpu")
    monkeypatch.setenv("BRAINMRI_DEVICE", "gpu")
    with pytest.raises(ValueError, match="BRAINMRI_DEVICE='gpu': must be one of auto, cuda, cpu"):
        devices.select_device()


# --- item 3: the CUDA RNG state of the job's own device, resumed on any device ----------------


def fake_cuda_rng(monkeypatch, count: int) -> list[tuple[int, torch.Tensor]]:
    """``count`` fake GPUs whose RNG state is a byte tensor filled with the device index; a
    device index beyond them raises as CUDA does. Returns the (index, state) pairs set."""
    done: list[tuple[int, torch.Tensor]] = []

    def index_of(device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= count:
            raise IndexError(f"CUDA error: invalid device ordinal {index} (of {count})")
        return index

    def get_state(device="cuda"):
        return torch.full((8,), index_of(device), dtype=torch.uint8)

    def set_state(state, device="cuda"):
        done.append((index_of(device), state.clone()))

    fake_gpus(monkeypatch, count)
    for module in (torch.cuda, torch.cuda.random):  # set_rng_state_all calls the second
        monkeypatch.setattr(module, "get_rng_state", get_state)
        monkeypatch.setattr(module, "set_rng_state", set_state)
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: [get_state(i) for i in range(count)]
    )
    return done


def test_the_cuda_rng_state_saved_is_that_of_the_jobs_device(monkeypatch, tmp_path):
    fake_cuda_rng(monkeypatch, 4)
    states = resume.rng_states(torch.device("cuda", 3))
    assert torch.equal(states["cuda"], torch.full((8,), 3, dtype=torch.uint8))
    torch.save(states, tmp_path / "state.pt")  # what the resume state holds, loaded safely
    assert torch.equal(safe_torch_load(tmp_path / "state.pt")["cuda"], states["cuda"])


def test_a_4_gpu_state_resumes_on_one_gpu(monkeypatch):
    """Saved with one state per visible GPU (the older format) on a 4-GPU box, resumed under
    SLURM with one GPU: the job's state goes to its one device, no IndexError."""
    four = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    fake_cuda_rng(monkeypatch, 4)
    old_format = {**resume.rng_states(torch.device("cpu")), "cuda": four}
    done = fake_cuda_rng(monkeypatch, 1)
    resume.set_rng_states(old_format, torch.device("cuda", 0))
    assert [(index, state.tolist()) for index, state in done] == [(0, [0] * 8)]
    done.clear()
    saved_on_3 = {**old_format, "cuda": four[3]}  # this format, saved on cuda:3
    resume.set_rng_states(saved_on_3, torch.device("cuda", 0))
    assert [(index, state.tolist()) for index, state in done] == [(0, [3] * 8)]
    done.clear()
    resume.set_rng_states(saved_on_3, torch.device("cpu"))  # resumed on the CPU: no CUDA call
    assert done == []
    done = fake_cuda_rng(monkeypatch, 4)  # the older format on its own box: cuda:2's entry
    resume.set_rng_states(old_format, torch.device("cuda", 2))
    assert [(index, state.tolist()) for index, state in done] == [(2, [2] * 8)]


# --- item 4: an empty grad-scaler state (a disabled scaler) resumed where it is enabled -------

REAL_SCALER = torch.amp.GradScaler


def tiny_fit(tmp_path: Path, epochs: int, scaler_on: bool, monkeypatch) -> list[dict]:
    """A linear classifier on 8 fixed samples, fp32 on the CPU; the grad scaler forced on (on the
    CPU device, as an fp16 card would have it) or left as the CPU has it (off)."""

    def scaler(*args, **kwargs):
        made = REAL_SCALER("cpu", enabled=scaler_on, init_scale=256.0)
        scalers.append(made)
        return made

    scalers: list[torch.amp.GradScaler] = []
    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    images = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 2
    result = fit(
        model, F.cross_entropy, accuracy_per_sample, lambda epoch: iter([(images, labels)]),
        lambda: iter([(images, labels)]), FitSettings(epochs=epochs, lr=0.01),
        torch.device("cpu"), tmp_path / "resume", "digest",
    )  # fmt: skip
    assert [made.is_enabled() for made in scalers] == [scaler_on]
    return result.history


@pytest.mark.parametrize(("first", "then"), [(False, True), (True, False), (True, True)])
def test_a_resume_state_resumes_with_the_scaler_on_or_off(monkeypatch, tmp_path, first, then):
    """Off then on (a bf16 or CPU state resumed on an fp16 card) raised before; on then off and
    on then on load as they did."""
    assert len(tiny_fit(tmp_path, 1, first, monkeypatch)) == 1
    saved = torch.load(tmp_path / "resume" / "state.pt", weights_only=True)["scaler"]
    assert bool(saved) == first  # a disabled scaler's state is {}
    history = tiny_fit(tmp_path, 2, then, monkeypatch)
    assert [row["epoch"] for row in history] == [1, 2]  # resumed after epoch 1
