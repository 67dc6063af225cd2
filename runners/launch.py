"""Devices: how many processes a run trains with, which one this process is, and the process group between them.

The training entry point is launcher-agnostic: it reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by
``run_suite --devices N`` here, or by torchrun) or, under ``srun``, ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
``SLURM_LOCALID``. The process group is initialised here, not by MMEngine's launchers: those call
``torch.cuda.set_device`` unconditionally and so cannot run on CPU (gloo). One process per device, per-device BN (no
SyncBN), as the papers train.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 1800  # a collective that waits longer than this fails the run instead of hanging it


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ=None) -> "DistEnv":
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            world = int(env["WORLD_SIZE"])
            return cls(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", world)))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            world = int(env["SLURM_NTASKS"])
            per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
            return cls(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                       int(per_node) if per_node.isdigit() else world)
        return cls()


def valid_device_counts(global_batch: int, per_device_batch: int) -> list[int]:
    """Device counts that keep ``global_batch`` with ``per_device_batch`` per device (by gradient accumulation)."""
    steps = global_batch // per_device_batch
    return [n for n in range(1, steps + 1) if steps % n == 0]


def accumulation(global_batch: int, per_device_batch: int, devices: int) -> int:
    """Micro-batches each device accumulates per optimizer step; ValueError naming the valid counts otherwise."""
    if global_batch % per_device_batch:
        raise ValueError(f"global batch {global_batch} is not a multiple of the per-device batch {per_device_batch}")
    valid = valid_device_counts(global_batch, per_device_batch)
    if devices not in valid:
        raise ValueError(f"{devices} device(s) cannot keep the global batch {global_batch} at {per_device_batch} per "
                         f"device; valid counts: {', '.join(map(str, valid))}")
    return global_batch // (per_device_batch * devices)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cpus_available() -> int:
    """CPUs this process may use: Slurm's allocation, else the affinity mask (not ``os.cpu_count()``)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loader_settings(dist: DistEnv, device: str, dataset: str) -> dict:
    """DataLoader workers, pinned memory and prefetch from the CPUs this process may use: one CPU stays with the
    training process, the rest (at most 8) decode images. Under Slurm the allocation is per task already. The small
    generated datasets (smoke's synthetic images, mini's digits) load in the process itself: starting workers would
    cost more than decoding a few hundred 32x32 PNGs."""
    from .data import EXTERNAL
    cpus = cpus_available()
    if "SLURM_CPUS_PER_TASK" not in os.environ:
        cpus = max(1, cpus // dist.local_world_size)
    workers = min(8, cpus - 1) if dataset in EXTERNAL else 0
    settings = dict(num_workers=workers, pin_memory=device.startswith("cuda"))
    if workers:
        # fork, as PyTorch does by default on Linux: a job process started by a forkserver would otherwise start
        # its own forkserver (a fresh interpreter importing torch) for the workers
        settings.update(prefetch_factor=2, multiprocessing_context="fork")
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _master_address() -> str:
    """MASTER_ADDR, else the first host of the Slurm allocation, else this host."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                 timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "127.0.0.1"


def init_process_group(dist: DistEnv, device: str, timeout_s: float | None = None) -> None:
    """Join the run's process group (gloo on CPU, NCCL on CUDA). A no-op for one process."""
    if not dist.distributed:
        return
    import torch
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", _master_address())
    if "MASTER_PORT" not in os.environ:
        job = os.environ.get("SLURM_JOB_ID", "")
        os.environ["MASTER_PORT"] = str(20000 + int(job) % 20000) if job.isdigit() else "29500"
    for key, value in (("RANK", dist.rank), ("WORLD_SIZE", dist.world_size), ("LOCAL_RANK", dist.local_rank)):
        os.environ[key] = str(value)  # MMEngine and torch read these
    if device.startswith("cuda"):
        torch.cuda.set_device(dist.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("REPBENCH_DIST_TIMEOUT",
                                                                             DEFAULT_TIMEOUT_S)))
    tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=dist.rank,
                             world_size=dist.world_size, timeout=timeout)


def destroy_process_group() -> None:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
