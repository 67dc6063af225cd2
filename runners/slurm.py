"""The Slurm executor: each invocation's runs as a submitit job array that a real cluster accepts.

Resources come from the suite (suites.Resources for the table's scale: GPUs or not, CPUs and memory per device, time
limit) and the run's device count (one task per device, started by ``srun``; a run wider than a node spans nodes);
site settings (partition, account, qos, constraint, extra ``#SBATCH`` lines, set-up lines, the artifacts root and the
submitit folder on the shared file system) from a small TOML file: ``--cluster FILE``, else ``$REPBENCH_CLUSTER``::

    partition = "gpu"
    account = "my-project"
    qos = "normal"
    constraint = "a100"
    gpus_per_node = 8             # node size: wider runs span nodes
    gpu_request = "gres"          # --gres=gpu:N, or "gpus-per-node" for --gpus-per-node=N
    array_parallelism = 32        # at most this many array tasks at once (the throttle: --array=0-N%32)
    artifacts = "/shared/repbench/artifacts"
    folder = "/shared/repbench/slurm"
    setup = ["module load cuda/12.4"]
    # cpus_per_task, mem_gb, time_min override the suite's resources
    [sbatch]                      # extra #SBATCH lines: key = value, or key = true for a bare flag
    exclusive = true

Submission returns at once with the job ids; each array task claims its run in the database and keeps the claim by a
heartbeat, so status comes from the database (``run_suite status``), never from ``sacct``. On Slurm's pre-timeout or
preemption signal (SIGUSR2, ``--signal=USR2@90``) training checkpoints and the job requeues itself; a job requeued
from outside (``scontrol requeue``: SIGTERM) checkpoints too, and either way the requeued job resumes.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

from results import Store

from .jobs import Job, execute

SITE_FILE_ENV = "REPBENCH_CLUSTER"


@dataclass
class Site:
    """A cluster's settings (the TOML file above). Unknown keys are refused, naming the known ones."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 8
    gpu_request: str = "gres"
    array_parallelism: int = 64
    artifacts: str | None = None
    folder: str = "results/slurm"
    setup: list[str] = field(default_factory=list)
    sbatch: dict = field(default_factory=dict)
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None

    @classmethod
    def load(cls, path: str | os.PathLike | None, **flags) -> "Site":
        """The site file (``path``, else ``$REPBENCH_CLUSTER``, else none) with command-line ``flags`` on top.
        ValueError (one line) for a file that cannot be read or holds unknown keys or bad values."""
        path = path or os.environ.get(SITE_FILE_ENV)
        values = {}
        if path:
            try:
                with open(path, "rb") as handle:
                    values = tomllib.load(handle)
            except OSError as e:
                raise ValueError(f"cluster file {path}: {e.strerror}") from None
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"cluster file {path} is not valid TOML: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"cluster file {path}: unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        values |= {k: v for k, v in flags.items() if v is not None}
        site = cls(**values)
        if site.gpu_request not in ("gres", "gpus-per-node"):
            raise ValueError(f"gpu_request must be 'gres' or 'gpus-per-node', not {site.gpu_request!r}")
        if site.gpus_per_node < 1 or site.array_parallelism < 1:
            raise ValueError("gpus_per_node and array_parallelism must be >= 1")
        return site


def slurm_parameters(resources, devices: int, site: Site, name: str) -> dict:
    """submitit parameters for runs of ``devices`` processes: one task per device (``srun`` starts them), GPUs by
    ``--gres`` or ``--gpus-per-node`` when the scale trains on GPUs, CPUs and memory per device, the time limit,
    and the site's partition, account, qos, constraint, extra lines and throttle. ValueError when the devices
    cannot be split evenly over nodes."""
    nodes = math.ceil(devices / site.gpus_per_node) if resources.gpus else 1
    if devices % nodes:
        raise ValueError(f"{devices} devices do not split evenly over {nodes} nodes of {site.gpus_per_node} GPUs")
    per_node = devices // nodes
    parameters = {
        "name": name, "nodes": nodes, "tasks_per_node": per_node,
        "cpus_per_task": site.cpus_per_task or resources.cpus_per_device,
        "mem_gb": site.mem_gb or resources.mem_gb_per_device * per_node,
        "timeout_min": site.time_min or resources.time_min,
        "slurm_array_parallelism": site.array_parallelism,
        "slurm_signal_delay_s": 120,  # SIGUSR2 this long before the time limit: checkpoint, then requeue
    }
    if resources.gpus:
        if site.gpu_request == "gres":
            parameters["slurm_gres"] = f"gpu:{per_node}"
        else:
            parameters["gpus_per_node"] = per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(site, key):
            parameters[f"slurm_{key}"] = getattr(site, key)
    if site.setup:
        parameters["slurm_setup"] = list(site.setup)
    if site.sbatch:
        parameters["slurm_additional_parameters"] = dict(site.sbatch)
    return parameters


def queued_jobs() -> set[str]:
    """Job ids Slurm still holds (pending, running, requeued), array tasks one by one (``12_3``); empty when
    ``squeue`` is unavailable. Only used to avoid submitting a run twice, never for a run's status."""
    if shutil.which("squeue") is None:
        return set()
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)
    return set(done.stdout.split()) if done.returncode == 0 else set()


def _entry(job: Job) -> str:
    """What each array task runs (every task of a multi-device run: its rank comes from SLURM_PROCID)."""
    import submitit

    from .probes import start_clean_fork_server
    if "SUBMITIT_DEBUG_JOB_ID" not in os.environ:  # a fresh process (debug runs in the caller's, which may have run
        start_clean_fork_server()                    # parallel ops already): see start_clean_fork_server
    status = execute(job, slurm_job_id=submitit.JobEnvironment().job_id)
    if status == "failed":
        raise RuntimeError(f"{job.label} failed (the database holds the error and traceback)")
    return status


class SlurmExecutor:
    """Submits jobs as submitit job arrays and returns at once. ``cluster``: ``slurm`` for real use (submitit's
    ``local`` and ``debug`` run the same entry without a cluster)."""

    name = "slurm"

    def __init__(self, site: Site | None = None, resources=None, cluster: str = "slurm"):
        self.site, self.resources, self.cluster = site or Site(), resources, cluster
        self.submitted: list = []

    def submit(self, jobs: Iterable[Job], store: Store, name: str = "repbench") -> list[str]:
        """Submit ``jobs`` (one array per device count); records each run's job id. Returns the job ids."""
        import submitit
        jobs = list(jobs)
        ids = []
        for devices in sorted({job.devices for job in jobs}):
            group = [job for job in jobs if job.devices == devices]
            executor = submitit.AutoExecutor(folder=Path(self.site.folder) / "%j", cluster=self.cluster)
            parameters = slurm_parameters(self.resources, devices, self.site, name)
            if self.cluster != "slurm":
                parameters = {k: v for k, v in parameters.items() if not k.startswith("slurm_")}
            executor.update_parameters(**parameters)
            handles = executor.map_array(_entry, group)
            self.submitted += handles
            for job, handle in zip(group, handles):
                store.mark_submitted(job.run_id, handle.job_id)
                ids.append(handle.job_id)
        return ids
