"""Executors: where jobs run. ``local`` runs them one after another, each in its own process (a crash, an OOM kill
or a hang of one job does not stop the rest); ``slurm`` submits them as a job array through submitit
(runners/slurm.py). Either way a worker claims its run before working on it (runners/claims.py): a run is executed
once however many invocations, array tasks or workers meet it."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from typing import Callable, Iterable

from results import Claim, Store
from results.models import now_ms

from .jobs import Job, execute
from .launch import free_port

Progress = Callable[[Job, str], None]   # a job's run has ended here (its status)
Waiting = Callable[[list], None]        # runs held by other workers that this invocation waits for

# Preloaded once by the fork server, so that each job starts in milliseconds, not seconds (torch._dynamo: what the
# first optimizer imports; matplotlib: what MMEngine's Visualizer imports when a Runner is built).
PRELOAD = ["torch", "torch._dynamo", "torchvision", "mmengine.runner", "mmengine.visualization", "matplotlib.figure",
           "matplotlib.backends.backend_agg", "sqlalchemy", "alembic", "backbones", "results", "suites",
           "runners.jobs", "runners.launch", "runners.probes", "runners.train"]


# How a worker's exit code tells the executor what became of its run (runners/jobs.py execute's status).
EXIT_CODES = {"finished": 0, "diverged": 0, "failed": 1, "held": 3, "lost": 3, "preempted": 4}


def _die_with(pid: int) -> None:
    """Kill this process as soon as process ``pid`` (the run_suite that started it) has ended, however it ended.
    A forkserver child's parent is the fork server, which outlives a killed run_suite for as long as any of its
    children lives (each holds the server's keep-alive pipe), so PR_SET_PDEATHSIG alone never fires there."""
    import select
    import threading

    def watch() -> None:
        try:
            handle = os.pidfd_open(pid)  # readable once the process has ended; immune to pid reuse
        except (AttributeError, OSError):
            handle = None
        while True:
            if handle is not None:
                select.select([handle], [], [])
            else:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                    continue
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="repbench-parent-watch", daemon=True).start()


def _worker(job: Job, rank: int = 0, port: int | None = None, parent: int | None = None) -> None:
    from .probes import _die_with_parent, start_clean_fork_server
    _die_with_parent()  # a killed run_suite takes its jobs with it; the re-run then retries them
    if rank == 0:  # first thing, while the process is fresh: memory probes then use the timing's thread count
        start_clean_fork_server()
    if parent is not None:
        _die_with(parent)
    # Ctrl-C in the terminal reaches the whole process group: run_suite alone handles it and stops its workers
    # with SIGTERM, on which they checkpoint (runners/train.py) and record the run as preempted.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if job.devices > 1:  # what torchrun would set; execute() reads it (runners/launch.py)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(job.devices), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(job.devices), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    status = execute(job)  # recorded in the database by now
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(EXIT_CODES[status])  # without the interpreter's teardown: a second per job of freeing models piecewise


def claimable(run, since_ms: int | None, force: bool) -> bool:
    """Whether a claim (results.Store.claim, which decides) would take the run now: a cheap look before starting
    a worker for it."""
    if run.status == "scheduled":
        return True
    if run.status == "running":
        return run.lease_expires_ms is not None and run.lease_expires_ms < now_ms()
    retry = ("failed", "finished", "diverged") if force else ("failed",)
    return run.status in retry and (run.ended_ms or 0) < (since_ms or now_ms())


class LocalExecutor:
    """Jobs one after another on this machine, each in its own process group of ``devices`` processes (a crash, an
    OOM kill or a hang of one job does not stop the rest). :meth:`run` works through the jobs it may claim, then
    waits for those that other workers hold, taking over any whose worker dies."""

    name = "local"

    def __init__(self, poll_s: float = 2.0):
        self._context = mp.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        from multiprocessing import forkserver
        forkserver.ensure_running()  # it imports PRELOAD (seconds) while the caller goes on planning
        self.poll_s = poll_s
        self._processes: list = []
        self._current: tuple[Job, Store] | None = None

    def run(self, jobs: Iterable[Job], store: Store, progress: Progress, waiting: Waiting | None = None) -> None:
        from .claims import expire_dead_local
        pending = {job.run_id: job for job in jobs}
        while pending:
            expire_dead_local(store)
            runs = store.runs(pending)
            worked = False
            for job in [job for run_id, job in pending.items() if claimable(runs[run_id], job.since_ms, job.fresh)]:
                status = self._run_one(job, store)
                if status != "held":  # held: another worker claimed it first
                    worked = True
                    del pending[job.run_id]
                    progress(job, status)
            if worked:
                continue  # look again before waiting: a held run may have ended meanwhile
            runs = store.runs(pending)
            for run_id, run in runs.items():
                if run.status != "running" and not claimable(run, pending[run_id].since_ms, pending[run_id].fresh):
                    progress(pending.pop(run_id), run.status)  # done by another worker
            held = [run for run in runs.values() if run.status == "running"]
            if held and waiting is not None:
                waiting(held)
            if pending:
                time.sleep(self.poll_s)

    def _run_one(self, job: Job, store: Store) -> str:
        port = free_port() if job.devices > 1 else None
        processes = [self._context.Process(target=_worker, args=(job, rank, port, os.getpid()),
                                           name=f"repbench {job.label} rank {rank}")
                     for rank in range(job.devices)]
        self._processes, self._current = processes, (job, store)
        for process in processes:
            process.start()
        codes = _join_group(processes)
        self._processes = []
        bad = [(rank, code) for rank, code in enumerate(codes) if code not in (0, 3, 4)]
        run = store.runs([job.run_id])[job.run_id]
        if bad and run.status == "running" and run.pid in {p.pid for p in processes}:
            rank, code = bad[0]
            what = "killed (out of memory?)" if code in (-9, 137) else "exited"
            where = f"rank {rank} " if job.devices > 1 else ""
            store.finish_run(run.id, "failed", error=f"worker process {where}{what} with code {code}",
                             claim=Claim(run.id, run.owner, run.attempt))
            return "failed"
        if codes[0] in (EXIT_CODES["held"], EXIT_CODES["preempted"]):
            return "held" if codes[0] == EXIT_CODES["held"] else "preempted"
        return store.runs([job.run_id])[job.run_id].status

    def stop(self, timeout_s: float = 60.0) -> None:
        """Interrupted (Ctrl-C, SIGTERM): SIGTERM the running job's processes, which checkpoint and record the run
        as preempted; whatever has not ended after ``timeout_s`` is killed."""
        processes = [p for p in self._processes if p.is_alive()]
        for p in processes:
            os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        if self._current is not None:  # a worker that died on the signal before recording anything
            job, store = self._current
            run = store.runs([job.run_id])[job.run_id]
            if run.status == "running" and run.pid in {p.pid for p in self._processes}:
                store.finish_run(run.id, "failed", error="stopped: run_suite was interrupted",
                                 claim=Claim(run.id, run.owner, run.attempt))


def _join_group(processes, poll_s: float = 0.2) -> list[int]:
    """Wait for all ranks; as soon as one exits non-zero the others are terminated (no rank waits on a dead peer
    until a collective times out). Returns the exit codes."""
    from multiprocessing.connection import wait
    while any(p.is_alive() for p in processes):
        if any(p.exitcode not in (None, 0, EXIT_CODES["held"], EXIT_CODES["preempted"]) for p in processes):
            for p in processes:
                if p.is_alive():
                    p.terminate()
            break
        wait([p.sentinel for p in processes if p.is_alive()], timeout=poll_s)  # wakes as soon as one exits
    for p in processes:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in processes]
