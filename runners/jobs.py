"""Plan (table + scale + seeds + rows) -> jobs, and what one job does in its worker process."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from results import MetricRecord, RunSpec, Store

PROBE_VERSION = 1  # bump when a probe's method changes: it enters the config hash, so old runs are not reused


@dataclass
class Job:
    """One run: a table row at one scale and seed. ``config`` is what the run key hashes (no machine-local paths);
    ``data_root``, ``db_url`` and ``artifacts_root`` say where, not what. ``fresh``: start from scratch (``--force``),
    removing the run's old checkpoints."""

    spec: RunSpec
    config: dict
    data_root: str
    db_url: str
    executor: str = "local"
    run_id: int | None = None
    artifacts_root: str = "results/artifacts"
    fresh: bool = False

    @property
    def label(self) -> str:
        return f"{self.spec.row_name} (seed {self.spec.seed})"

    @property
    def devices(self) -> int:
        return self.config["world_size"]

    @property
    def run_dir(self) -> Path:
        """This run's own folder under the artifacts root: checkpoints, log, final weights."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.spec.row_name).strip("_")
        return (Path(self.artifacts_root) / self.spec.table_name / self.spec.scale
                / f"{slug}-seed{self.spec.seed}-{self.spec.run_key[:12]}")


def resolve_artifacts_root(path: str | None) -> Path:
    """``--artifacts``, else ``$REPBENCH_ARTIFACTS``, else ``results/artifacts`` in the working directory."""
    return Path(path or os.environ.get("REPBENCH_ARTIFACTS") or "results/artifacts")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_key(table: str, row: str, scale: str, seed: int, chash: str) -> str:
    return hashlib.sha256(f"{table}\x1f{row}\x1f{scale}\x1f{seed}\x1f{chash}".encode()).hexdigest()


def batch_plan(recipe, devices: int) -> dict:
    """How ``devices`` processes keep the recipe's global batch and lr: the values every run records. Raises
    ValueError naming the valid device counts when ``devices`` cannot keep it."""
    from .launch import accumulation
    accum = accumulation(recipe.global_batch, recipe.batch, devices)
    return {"world_size": devices, "grad_accum": accum, "per_device_batch": recipe.batch,
            "global_batch": recipe.batch * devices * accum, "lr": recipe.lr,
            "paper_devices": recipe.devices, "paper_global_batch": recipe.global_batch}


def plan(table, scale: str, seeds: int, only: list[str] | None, data_root: str, db_url: str,
         executor: str = "local", devices: int = 1, follow: str = "code", artifacts_root: str | None = None,
         fresh: bool = False) -> list[Job]:
    """Jobs for ``table`` (a suites.Table) at ``scale``: every row (or ``only``) x seeds 0..seeds-1, trained by
    ``devices`` processes with the recipe as the official code (``follow="code"``) or the paper's text runs it."""
    from backbones import resolve_variant
    from .data import NUM_CLASSES

    recipe = table.recipes[scale].following(follow)
    batches = batch_plan(recipe, devices)
    rows = [table.row(name) for name in only] if only else list(table.rows)
    jobs = []
    for row in rows:
        for seed in range(seeds):
            config = {
                "table": table.key, "row": row.name, "scale": scale, "seed": seed,
                "arch": row.arch, "rep": row.rep, "variant": resolve_variant(row.rep, row.variant).as_dict(),
                "num_classes": NUM_CLASSES[recipe.dataset], "recipe": recipe.as_dict(), **batches,
                "metrics": list(table.metrics), "probe_version": PROBE_VERSION,
            }
            chash = config_hash(config)
            spec = RunSpec(run_key(table.key, row.name, scale, seed, chash), table.key, row.name, scale, seed, chash,
                           config)
            jobs.append(Job(spec, config, data_root, db_url, executor,
                            artifacts_root=str(resolve_artifacts_root(artifacts_root)),
                            fresh=fresh))
    return jobs


def environment(device: str) -> dict:
    import torch
    from .probes import device_name

    try:
        import mmcv
        mmcv_version = mmcv.__version__
    except ImportError:
        mmcv_version = None
    repo = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "mmcv": mmcv_version, "device_name": device_name(device), "host": socket.gethostname(),
            "platform": platform.platform()}


def execute(job: Job, slurm_job_id: str | None = None) -> str:
    """Run one job as this process's share of it and record everything through the store. Returns the final status.

    Launcher-agnostic: the process's rank comes from the environment (runners/launch.py). Rank 0 runs the cost
    probes and records the run; every rank trains; only rank 0 writes metrics and artifacts. Any rank that fails
    marks the run failed (the launcher stops the others; collectives time out rather than hang).
    """
    import torch

    from backbones import build_classifier
    from suites import Recipe
    from .launch import DistEnv, cpus_available, destroy_process_group, init_process_group

    dist = DistEnv.from_env()
    store = Store(job.db_url, migrate=False)
    run_id = job.run_id if job.run_id is not None else store.ensure_run(job.spec).id
    if dist.is_main:
        store.start_run(run_id, pid=os.getpid(), host=socket.gethostname(), executor=job.executor,
                        slurm_job_id=slurm_job_id)
    try:
        device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
        threads = max(1, cpus_available() // (1 if os.environ.get("SLURM_CPUS_PER_TASK") else dist.local_world_size))
        torch.set_num_threads(threads)
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for data workers; MMEngine would force 1
            os.environ.setdefault(variable, str(threads))
        init_process_group(dist, device)
        run_dir = job.run_dir
        if dist.is_main and job.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
            store.remove_artifacts(run_id)
        if dist.distributed:
            torch.distributed.barrier()  # nobody reads a checkpoint that --force is removing
        c = job.config
        recipe = Recipe.from_dict(c["recipe"])
        torch.manual_seed(c["seed"])

        def factory():
            return build_classifier(c["arch"], c["rep"], c["num_classes"], c["variant"])

        if dist.is_main:
            store.log_environment(run_id, environment(device))
            _measure_costs(store, run_id, factory, recipe, c, device)
        status, diverged_step, error = "finished", None, None
        if "top1" in c["metrics"] and recipe.train_accuracy:
            torch.manual_seed(c["seed"])  # the initial weights do not depend on which probes ran before
            status, diverged_step, error = _train(store, run_id, job, factory(), recipe, device, dist)
        if dist.is_main:
            store.finish_run(run_id, status, error=error, diverged_step=diverged_step)
        return status
    except Exception as e:  # noqa: BLE001 - any failure of one job is recorded, the others go on
        where = f" (rank {dist.rank} of {dist.world_size})" if dist.distributed else ""
        store.finish_run(run_id, "failed", error=f"{type(e).__name__}{where}: {e}", traceback=traceback.format_exc())
        return "failed"
    finally:
        destroy_process_group()
        store.close()


def _measure_costs(store: Store, run_id: int, factory, recipe, c: dict, device: str) -> None:
    """The cost probes of runners/probes.py, on rank 0, before training."""
    import torch

    from backbones import deploy
    from . import probes

    context = dict(device=probes.device_name(device), dtype="float32", threads=torch.get_num_threads())
    cost = dict(batch=recipe.cost_batch, resolution=recipe.cost_resolution, **context)

    def record(m: probes.Measurement, **where):
        records = [MetricRecord(m.name, m.value, m.unit, method=m.method, **where)]
        records += [MetricRecord(k, v, m.unit, method=m.method, **where) for k, v in m.extra.items()]
        store.log_metrics(run_id, records)

    if "train_memory" in c["metrics"]:
        record(probes.probe_train_memory(factory, recipe.cost_batch, recipe.cost_resolution, c["num_classes"],
                                         device, recipe.cost_warmup, recipe.memory_cap_gb), **cost)
    if "time_per_batch" in c["metrics"]:
        record(probes.probe_train_time(factory(), recipe.cost_batch, recipe.cost_resolution, c["num_classes"],
                                       device, recipe.cost_warmup, recipe.cost_steps), **cost)
    for m in probes.probe_params_macs(factory, deploy, 224):
        record(m, resolution=224, dtype="float32")
    deployed = deploy(factory())
    for m in probes.probe_inference(deployed, recipe.cost_resolution, device, recipe.latency_batch,
                                    recipe.throughput_batch, recipe.cost_warmup, recipe.cost_steps):
        record(m, batch=recipe.latency_batch if m.name == "latency" else recipe.throughput_batch,
               resolution=recipe.cost_resolution, **context)


def _train(store: Store, run_id: int, job: Job, model, recipe, device: str, dist) -> tuple[str, int | None, str | None]:
    """The accuracy run: per-epoch top-1 and loss stored with their step, checkpoints and final weights recorded as
    artifacts (rank 0). Returns (status, diverged step, error)."""
    import copy

    import torch

    from backbones import deploy, save_checkpoint
    from . import probes
    from .train import Diverged, Preempted, sha256_of, train_classifier

    c = job.config
    run_dir = job.run_dir
    context = dict(device=probes.device_name(device), dtype="float32", threads=torch.get_num_threads(),
                   batch=c["global_batch"], resolution=recipe.resolution)
    how = (f"{c['world_size']} process(es) x {c['grad_accum']} micro-batch(es) x {c['per_device_batch']} = global "
           f"batch {c['global_batch']}, lr {c['lr']:g}")
    logged_steps: set[int] = set()
    log_file = run_dir / "run.log"
    echo = not sys.stdout.isatty()

    def log(line: str) -> None:
        line = f"{job.label}: {line}"
        if echo:
            print(line, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def on_epoch(record: dict) -> None:
        if record["step"] in logged_steps:
            return
        logged_steps.add(record["step"])
        method = (f"top-1 on {record['val_images']} {recipe.dataset} val images after epoch {record['epoch']} "
                  f"({record['step']} optimizer steps; {how}; MMEngine Runner)")
        store.log_metrics(run_id, [
            MetricRecord("top1", record["top1"], "%", step=record["step"], method=method, **context),
            MetricRecord("train_loss", record["train_loss"], "nats", step=record["step"],
                         method=f"mean cross-entropy of epoch {record['epoch']} over all processes", **context)])

    def on_checkpoint(kind, path, size, sha, epoch):
        if kind == "removed":
            store.remove_artifacts(run_id, path=str(path))
        else:
            store.log_artifact(run_id, kind, str(path), size, sha, epoch)

    def record_log() -> None:
        if dist.is_main and log_file.is_file():
            store.log_artifact(run_id, "log", str(log_file), log_file.stat().st_size, sha256_of(log_file), None)

    try:
        result = train_classifier(model, recipe, Path(job.data_root), c["seed"], device, dist, c["grad_accum"],
                                  run_dir, log, on_epoch if dist.is_main else None, on_checkpoint)
    except Diverged as e:
        if dist.is_main:
            log(f"diverged: {e}")
            store.log_metrics(run_id, [MetricRecord("top1", float("nan"), "%", step=e.step, method=f"diverged: {e}",
                                                    **context)])
        record_log()
        return "diverged", e.step, str(e)
    except Preempted as e:
        if dist.is_main:
            log(f"preempted: {e}")
        record_log()
        return "failed", None, f"preempted: {e}; a re-run resumes from the checkpoint"
    except Exception:
        record_log()
        raise
    if not dist.is_main:
        return "finished", None, None
    for record in result.epochs:  # epochs trained before a resume: their metrics were cleared with the retry
        on_epoch(record)
    if recipe.checkpoints:
        for form, weights in (("weights_train", model), ("weights_deploy", deploy(copy.deepcopy(model).eval()))):
            path = save_checkpoint(weights, run_dir / f"{form.replace('_', '-')}.pth", table=c["table"],
                                   row=c["row"], scale=c["scale"], seed=c["seed"], variant=c["variant"])
            store.log_artifact(run_id, form, str(path), path.stat().st_size, sha256_of(path), recipe.epochs)
    log(f"finished: top-1 {result.top1:.2f}%  loss {result.train_loss:.4f}  ({result.iters} optimizer steps)")
    record_log()
    return "finished", None, None
