"""A throw-away one-node SLURM cluster for the tests: munged, slurmctld and slurmd on this host.

Needs root and Debian's packages ``slurmctld slurmd slurm-client munge`` (``.ci/run`` installs
them). Everything lives in one private folder: its own munge key and socket, a ``slurm.conf``
on free loopback ports, state, spool and logs. Nothing touches a system SLURM or munge; clients
find the cluster through ``SLURM_CONF`` (``cluster.env``).

Clients find the private ``slurm.conf`` through ``SLURM_CONF``. Inside a job, though,
snakemake-executor-plugin-slurm-jobstep drops every ``SLURM_*`` variable but the job's identity
before its nested ``srun`` (on a real cluster srun then reads /etc/slurm/slurm.conf), so
``cluster.env`` also puts wrappers of the client commands first on ``PATH`` that set it.

The node has ``Gres=gpu:<gpus>`` backed by ``/dev/null`` so that GPU requests (``--gpus=1``) are
accepted and recorded; jobs run on the CPU. Accounting is off (``accounting_storage/none``), so
only ``squeue``/``scontrol`` know the jobs, and ``MinJobAge`` keeps finished ones visible.

    cluster = start_cluster()      # raises ClusterUnavailable with the reason
    try:
        cluster.run("sbatch", "--wrap", "true")
        cluster.jobs()             # `scontrol show job` as dicts
    finally:
        cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_BINARIES = (
    "munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol"
)  # fmt: skip
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "sacct")
DEBIAN_PACKAGES = "slurmctld slurmd slurm-client munge"
PARTITION = "local"
MIN_JOB_AGE = 3600


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be started here; the message says why."""


@dataclass
class SlurmCluster:
    """A running one-node cluster; ``env`` points SLURM clients at it."""

    root: Path
    conf: Path
    node: str
    partition: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        result = subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (``scontrol show job``), one dict per job."""
        return [
            parse_scontrol_line(line)
            for line in self.run("scontrol", "-o", "show", "job").splitlines()
            if line.startswith("JobId=")
        ]

    def log_tail(self, lines: int = 30) -> str:
        """The end of each daemon's log, for error messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, stop the daemons this object started, delete the folder."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + 20
            while (
                time.monotonic() < deadline
                and self.run("squeue", "-h", "-t", "PD,R,CG", check=False).strip()
            ):
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value two`` (one ``scontrol -o`` line) -> dict; values may hold spaces."""
    fields: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        name, sep, value = token.partition("=")
        if sep and name and " " not in name and (name[0].isupper() or name[0].isdigit()):
            key = name
            fields[key] = value
        elif key is not None and token:
            fields[key] += " " + token
    return fields


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterUnavailable("cannot read MemTotal from /proc/meminfo")


def slurm_conf(root: Path, node: str, cpus: int, memory: int, gpus: int) -> str:
    """The cluster's slurm.conf: one node, cons_tres, no accounting, a generous MinJobAge."""
    ctld_port, d_port = free_port(), free_port()
    return f"""\
ClusterName=brainmri-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
GresTypes=gpu
MinJobAge={MIN_JOB_AGE}
ReturnToService=2
SchedulerType=sched/backfill
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:{gpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(gpus: int = 1, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd in a fresh folder; wait until the node is idle."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmd needs root")
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        raise ClusterUnavailable(
            f"{', '.join(missing)} not found: apt-get install -y {DEBIAN_PACKAGES}"
        )
    # munged wants the socket's folder (and its parents) reachable by everyone: not tmp_path.
    root = Path(tempfile.mkdtemp(prefix="brainmri-slurm-"))
    root.chmod(0o755)
    for sub in ("munge", "run", "state", "spool", "log", "bin"):
        (root / sub).mkdir(mode=0o755)
    (root / "munge").chmod(0o700)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, os.cpu_count() or 1, memory_mb() * 9 // 10, gpus))
    (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File=/dev/null Count={gpus}\n")
    for name in CLIENTS:
        real = shutil.which(name)
        if real:
            wrapper = root / "bin" / name
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {real} "$@"\n')
            wrapper.chmod(0o755)
    path = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": path}
    for name in list(env):
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_")) and name != "SLURM_CONF":
            del env[name]
    cluster = SlurmCluster(root=root, conf=conf, node=node, partition=PARTITION, env=env)

    def launch(name: str, *args: str) -> None:
        out = open(root / "log" / f"{name}.out", "wb")  # noqa: SIM115
        cluster.processes[name] = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        out.close()

    try:
        key = root / "munge" / "munge.key"
        subprocess.run(
            ["mungekey", "--create", f"--keyfile={key}"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        launch(
            "munged",
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={root}/run/munge.socket",
            f"--pid-file={root}/run/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed",
        )
        wait_for(lambda: (root / "run" / "munge.socket").exists(), timeout, "munged", cluster)
        launch("slurmctld", "slurmctld", "-D", "-f", str(conf))
        wait_for(
            lambda: cluster.run("scontrol", "ping", check=False).count("UP") > 0,
            timeout,
            "slurmctld",
            cluster,
        )
        launch("slurmd", "slurmd", "-D", "-f", str(conf))
        wait_for(
            lambda: cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip() == "idle",
            timeout,
            "slurmd (node idle)",
            cluster,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for(condition, timeout: float, what: str, cluster: SlurmCluster) -> None:
    """Poll ``condition`` until true; raise ClusterUnavailable with the daemons' logs if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise ClusterUnavailable(
                    f"{name} exited with {process.returncode}\n{cluster.log_tail()}"
                )
        try:
            if condition():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    raise ClusterUnavailable(f"{what} not ready after {timeout:.0f} s\n{cluster.log_tail()}")
