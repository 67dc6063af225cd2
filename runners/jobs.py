"""Plan (table + scale + seeds + rows) -> jobs, and what one job does in its worker process."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path

from results import MetricRecord, RunSpec, Store

PROBE_VERSION = 1  # bump when a probe's method changes: it enters the config hash, so old runs are not reused


@dataclass
class Job:
    """One run: a table row at one scale and seed. ``config`` is what the run key hashes (no machine-local paths);
    ``data_root`` and ``db_url`` say where, not what."""

    spec: RunSpec
    config: dict
    data_root: str
    db_url: str
    executor: str = "local"
    run_id: int | None = None

    @property
    def label(self) -> str:
        return f"{self.spec.row_name} (seed {self.spec.seed})"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_key(table: str, row: str, scale: str, seed: int, chash: str) -> str:
    return hashlib.sha256(f"{table}\x1f{row}\x1f{scale}\x1f{seed}\x1f{chash}".encode()).hexdigest()


def plan(table, scale: str, seeds: int, only: list[str] | None, data_root: str, db_url: str,
         executor: str = "local") -> list[Job]:
    """Jobs for ``table`` (a suites.Table) at ``scale``: every row (or ``only``) x seeds 0..seeds-1."""
    from backbones import resolve_variant
    from .data import NUM_CLASSES

    recipe = table.recipes[scale]
    rows = [table.row(name) for name in only] if only else list(table.rows)
    jobs = []
    for row in rows:
        for seed in range(seeds):
            config = {
                "table": table.key, "row": row.name, "scale": scale, "seed": seed,
                "arch": row.arch, "rep": row.rep, "variant": resolve_variant(row.rep, row.variant).as_dict(),
                "num_classes": NUM_CLASSES[recipe.dataset], "recipe": recipe.as_dict(),
                "metrics": list(table.metrics), "probe_version": PROBE_VERSION,
            }
            chash = config_hash(config)
            spec = RunSpec(run_key(table.key, row.name, scale, seed, chash), table.key, row.name, scale, seed, chash,
                           config)
            jobs.append(Job(spec, config, data_root, db_url, executor))
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
    """Run one job in this process and record everything through the store. Returns the final status."""
    import torch

    from backbones import build_classifier, deploy
    from suites import Recipe
    from . import probes
    from .train import Diverged, train_classifier

    store = Store(job.db_url, migrate=False)
    run_id = job.run_id if job.run_id is not None else store.ensure_run(job.spec).id
    store.start_run(run_id, pid=os.getpid(), host=socket.gethostname(), executor=job.executor,
                    slurm_job_id=slurm_job_id)
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        store.log_environment(run_id, environment(device))
        torch.set_num_threads(os.cpu_count() or 1)
        c = job.config
        recipe = Recipe(**c["recipe"])
        torch.manual_seed(c["seed"])

        def factory():
            return build_classifier(c["arch"], c["rep"], c["num_classes"], c["variant"])

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
        model = factory()
        deployed = deploy(factory())
        for m in probes.probe_inference(deployed, recipe.cost_resolution, device, recipe.latency_batch,
                                        recipe.throughput_batch, recipe.cost_warmup, recipe.cost_steps):
            record(m, batch=recipe.latency_batch if m.name == "latency" else recipe.throughput_batch,
                   resolution=recipe.cost_resolution, **context)
        del deployed
        status, diverged_step, error = "finished", None, None
        if "top1" in c["metrics"] and recipe.train_accuracy:
            try:
                result = train_classifier(model, recipe, Path(job.data_root), c["seed"], device)
                store.log_metrics(run_id, [
                    MetricRecord("top1", result["top1"], "%", step=result["iters"], batch=recipe.batch,
                                 resolution=recipe.resolution, method=f"top-1 on {result['val_images']} "
                                 f"{recipe.dataset} val images after {result['iters']} iterations (MMEngine Runner)",
                                 **context),
                    MetricRecord("train_loss", result["train_loss"], "nats", step=result["iters"], batch=recipe.batch,
                                 resolution=recipe.resolution, method="cross-entropy of the last iteration",
                                 **context)])
            except Diverged as e:
                status, diverged_step, error = "diverged", e.step, str(e)
                store.log_metrics(run_id, [MetricRecord("top1", float("nan"), "%", step=e.step, batch=recipe.batch,
                                                        resolution=recipe.resolution, method=f"diverged: {e}",
                                                        **context)])
        store.finish_run(run_id, status, error=error, diverged_step=diverged_step)
        return status
    except Exception as e:  # noqa: BLE001 - any failure of one job is recorded, the others go on
        store.finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return "failed"
    finally:
        store.close()

