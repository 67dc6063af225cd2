"""Executors: where jobs run. ``local`` runs them one after another, each in its own process (a crash, an OOM kill
or a hang of one job does not stop the rest); ``slurm`` submits them as a job array through submitit."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from results import Store

from .jobs import Job, execute
from .launch import free_port

Progress = Callable[[Job, str], None]

# Preloaded once by the fork server, so that each job starts in milliseconds, not seconds.
PRELOAD = ["torch", "torchvision", "mmengine.runner", "sqlalchemy", "alembic", "backbones", "results", "suites",
           "runners.jobs", "runners.launch", "runners.probes", "runners.train"]


def _worker(job: Job, rank: int = 0, port: int | None = None) -> None:
    from .probes import _die_with_parent
    _die_with_parent()  # a killed run_suite takes its jobs with it; the re-run then retries them
    if job.devices > 1:  # what torchrun would set; execute() reads it (runners/launch.py)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(job.devices), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(job.devices), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    status = execute(job)
    sys.exit(1 if status == "failed" else 0)  # the launcher stops the other ranks of a failed run


class LocalExecutor:
    name = "local"

    def __init__(self):
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)

    def run(self, jobs: Iterable[Job], store: Store, progress: Progress) -> None:
        for job in jobs:
            port = free_port() if job.devices > 1 else None
            processes = [self._context.Process(target=_worker, args=(job, rank, port),
                                               name=f"repbench {job.label} rank {rank}")
                         for rank in range(job.devices)]
            for process in processes:
                process.start()
            codes = _join_group(processes)
            bad = [(rank, code) for rank, code in enumerate(codes) if code != 0]
            if bad:
                run = store.get_run(job.spec.run_key)
                if run is not None and run.status in ("scheduled", "running"):
                    rank, code = bad[0]
                    what = "killed (out of memory?)" if code in (-9, 137) else "exited"
                    where = f"rank {rank} " if job.devices > 1 else ""
                    store.finish_run(run.id, "failed", error=f"worker process {where}{what} with code {code}")
            run = store.get_run(job.spec.run_key)
            progress(job, run.status if run else "failed")


def _join_group(processes, poll_s: float = 0.2) -> list[int]:
    """Wait for all ranks; as soon as one exits non-zero the others are terminated (no rank waits on a dead peer
    until a collective times out). Returns the exit codes."""
    while any(p.is_alive() for p in processes):
        if any(p.exitcode not in (None, 0) for p in processes):
            for p in processes:
                if p.is_alive():
                    p.terminate()
            break
        time.sleep(poll_s)
    for p in processes:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in processes]


def _submitit_entry(job: Job) -> str:
    import submitit
    try:
        slurm_id = submitit.JobEnvironment().job_id
    except RuntimeError:
        slurm_id = None
    return execute(job, slurm_job_id=slurm_id)


class SubmititExecutor:
    """A submitit job array. ``cluster`` is ``slurm`` for real use; submitit's ``local`` and ``debug`` executors run
    the same path without a cluster (that is how the tests run it)."""

    name = "slurm"

    def __init__(self, folder: str | os.PathLike = "results/slurm", cluster: str = "slurm", **parameters):
        self.folder, self.cluster = Path(folder), cluster
        self.parameters = {"timeout_min": 24 * 60, "slurm_array_parallelism": 64} | parameters

    def run(self, jobs: Iterable[Job], store: Store, progress: Progress) -> None:
        import submitit
        jobs = list(jobs)
        executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        executor.update_parameters(**self.parameters)  # slurm_* keys are ignored by the local/debug executors
        devices = {job.devices for job in jobs}
        if devices != {1}:  # one task per device; each task finds its rank in SLURM_PROCID (runners/launch.py)
            executor.update_parameters(tasks_per_node=max(devices))
        submitted = executor.map_array(_submitit_entry, jobs)
        for job, handle in zip(jobs, submitted):
            try:
                handle.result()
            except Exception as e:  # noqa: BLE001 - a job that died outside execute() is recorded as failed
                run = store.get_run(job.spec.run_key)
                if run is not None and run.status in ("scheduled", "running"):
                    store.finish_run(run.id, "failed", error=f"{self.cluster} job {handle.job_id} failed: {e}")
            run = store.get_run(job.spec.run_key)
            progress(job, run.status if run else "failed")


def build_executor(name: str):
    if name == "local":
        return LocalExecutor()
    if name == "slurm":
        return SubmititExecutor()
    raise ValueError(f"unknown executor {name!r} (local or slurm)")


def run_is_alive(run) -> bool:
    """Whether a run marked ``running`` still has a process: local runs by pid on this host, Slurm runs by job id."""
    if run.executor == "slurm" and run.slurm_job_id:
        if shutil.which("squeue") is None:
            return False
        out = subprocess.run(["squeue", "-h", "-j", str(run.slurm_job_id)], capture_output=True, text=True)
        return bool(out.stdout.strip())
    if run.host != socket.gethostname() or run.pid is None:
        return run.host != socket.gethostname()  # another machine's local run: we cannot tell, leave it
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
