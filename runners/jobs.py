"""Plan (table + scale + seeds + rows) -> jobs, and what one job does in its worker process."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sys
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from results import LeaseLost, MetricRecord, RunSpec, Store, error_reason, mask_url

PROBE_VERSION = 2  # bump when a probe's method changes: it enters the config hash, so old runs are not reused
FINGERPRINTED = ("backbones", "runners")  # packages whose source enters every run's config hash


@functools.cache
def code_fingerprint() -> dict:
    """What measured a run, for its config hash: the probe-protocol version and a digest of the source of the
    packages that build the models and run the probes (every ``*.py`` under backbones/ and runners/). A code change
    there gives new run keys: old numbers are never reused for, or averaged with, new ones (the report lists them as
    superseded)."""
    import importlib
    digest = hashlib.sha256()
    for package in FINGERPRINTED:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return {"probe_version": PROBE_VERSION, "source": digest.hexdigest()[:16]}


def lr_text(config: dict, recipe) -> str:
    """The lr a run trains with, as shown to a person: the recipe's adaptive lr and the optimizer's name for an
    adaptive optimizer (a row's ``optimizer="adamw"``), else the (scaled) SGD lr."""
    optimizer = config.get("optimizer")
    return f"{recipe.adaptive_lr:g} ({optimizer})" if optimizer not in (None, "sgd") else f"{config['lr']:g}"


@dataclass
class Job:
    """One run: a table row at one scale and seed. ``config`` is what the run key hashes (no machine-local paths;
    the config hash leaves out the seed, so that the seeds of one config share it: the report groups them by it);
    ``data_root``, ``db_url`` and ``artifacts_root`` say where, not what (``db_url`` never holds a password: workers
    inherit it in ``PGPASSWORD``, results.split_secret). ``fresh``: start from scratch (``--force``), removing the
    run's old checkpoints."""

    spec: RunSpec
    config: dict
    data_root: str
    db_url: str
    executor: str = "local"
    run_id: int | None = None
    artifacts_root: str = "results/artifacts"
    fresh: bool = False
    since_ms: int | None = None  # when the invocation (or submission) began: runs that failed before it are retried
    scales_file: str | None = None  # RepOpt rows given --scales: the file (its sha256 is in the config)
    pretrained_file: str | None = None  # dense rows: the backbone's checkpoint (its sha256 is in the config)

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


def row_recipe(table, scale: str, row, follow: str, data_root):
    """The recipe ``row`` of ``table`` runs with: the table's, the row's departures (Row.recipe), the code's or the
    paper text's choices (``follow``); at mini scale, the paper's own dataset instead of the digits stand-in where
    ``data_root`` holds it (CIFAR-100, ImageNet, Caltech256; the mini recipe otherwise unchanged, recorded in the run's
    config as every recipe field is)."""
    from .data import EXTERNAL, DatasetMissing, check_dataset
    recipe = table.recipe(scale, row).following(follow)
    if scale == "mini" and "paper" in table.recipes:
        real = table.recipe("paper", row).dataset
        if real in EXTERNAL:
            try:
                check_dataset(real, Path(data_root))
            except DatasetMissing:
                return recipe
            return replace(recipe, dataset=real)
    return recipe


def plan(table, scale: str, seeds: int, only: list[str] | None, data_root: str, db_url: str,
         executor: str = "local", devices: int = 1, follow: str = "code", artifacts_root: str | None = None,
         fresh: bool = False, since_ms: int | None = None, scales_file: str | None = None,
         pretrained: dict[str, dict] | None = None) -> list[Job]:
    """Jobs for ``table`` (a suites.Table) at ``scale``: every row (or ``only``) x seeds 0..seeds-1, trained by
    ``devices`` processes with the recipe as the official code (``follow="code"``) or the paper's text runs it.
    RepOpt rows bring their Hyper-Search run (planned first), unless ``scales_file`` gives their searched scales.
    A dense table's rows (``runner="dense"``) start from ``pretrained[row]`` (runners/dense.py find_pretrained, or a
    user's file: ``{"path", "sha256", ...}``) where given."""
    import suites
    from .data import NUM_CLASSES

    rows = [table.row(name) for name in only] if only else [row for row in table.rows if not row.declared]
    if table.runner == "dense":
        return _plan_dense(table, scale, seeds, rows, data_root, db_url, executor, devices, artifacts_root, fresh,
                           since_ms, pretrained or {})
    # a form's metric (latency_srep: RepNeXt) asks for its probe too
    asked = set(table.metrics) | {m.rsplit("_", 1)[0] for m in table.metrics if m.endswith(("_train", "_srep",
                                                                                             "_linear", "_cpu"))}
    costs = {"train_memory", "time_per_batch", "train_speed", "max_batch_size", "latency"} & asked

    jobs = []
    for row in rows:
        recipe = row_recipe(table, scale, row, follow, data_root)
        batches = batch_plan(recipe, devices)
        scales = None
        if row.scales is not None:
            scales = row.scales.as_dict()
            if scales_file and row.scales.upstream:  # a file given instead of the row's own search
                scales.update(table=None, row=None, file_sha256=_sha256(Path(scales_file)))
            elif row.scales.upstream:  # the Hyper-Search run goes first (planned once however many rows use it)
                source = suites.get_table(row.scales.table)
                upstream = plan(source, scale, 1, [row.scales.row], data_root, db_url, executor, devices, follow,
                                artifacts_root, False, since_ms)[0]  # --force re-runs the rows, not their source
                scales["run_key"] = upstream.spec.run_key
                if all(job.spec.run_key != upstream.spec.run_key for job in jobs):
                    jobs.append(upstream)
        measures = None
        if row.measures is not None:  # another run's final weights, measured instead of training (planned first)
            source = suites.get_table(row.measures[0])
            planned = plan(source, scale, 1, [row.measures[1]], data_root, db_url, executor, devices, follow,
                           artifacts_root, False, since_ms)  # the source row, after its own upstream (RepOpt: HS)
            upstream = next(job for job in planned if job.spec.row_name == row.measures[1])
            measures = {"table": row.measures[0], "row": row.measures[1], "run_key": upstream.spec.run_key}
            jobs += [job for job in planned if all(job.spec.run_key != j.spec.run_key for j in jobs)]
        structure = None
        if row.structure is not None:  # the grown structure of another run (planned first, once)
            source = suites.get_table(row.structure.table)
            upstream = plan(source, scale, 1, [row.structure.row], data_root, db_url, executor, devices, follow,
                            artifacts_root, False, since_ms)[0]
            structure = {**row.structure.as_dict(scale), "run_key": upstream.spec.run_key}
            if all(job.spec.run_key != upstream.spec.run_key for job in jobs):
                jobs.append(upstream)
        # the group's baseline model is re-measured in every row's run, interleaved with the row's own (its ratios)
        baseline = table.baseline_of(row) if costs else None
        for seed in range(seeds):
            config = {
                "table": table.key, "row": row.name, "scale": scale, "seed": seed, **_model_of(row),
                "baseline": {"row": baseline, **_model_of(table.row(baseline))} if baseline else None,
                "num_classes": table.num_classes or NUM_CLASSES[recipe.dataset], "recipe": recipe.as_dict(),
                **batches,
                "metrics": list(table.metrics), "code": code_fingerprint(),
                **({"scales": scales} if scales else {}),
                **({"optimizer": row.optimizer} if row.optimizer else {}),
                **({"dyrep": row.dyrep.as_dict()} if row.dyrep else {}),
                **({"structure": structure} if structure else {}),
                **({"measures": measures} if measures else {}),
                **({"kernel_form": row.kernel_form} if row.kernel_form else {}),
                **({"qat": row.qat} if row.qat else {}),
                **({"forms": list(row.forms)} if row.forms else {}),
                **({"deployed": row.deployed} if row.deployed != "deploy" else {}),
            }
            chash = config_hash({k: v for k, v in config.items() if k != "seed"})  # the seeds of one config share it
            spec = RunSpec(run_key(table.key, row.name, scale, seed, chash), table.key, row.name, scale, seed, chash,
                           config)
            jobs.append(Job(spec, config, data_root, db_url, executor,
                            artifacts_root=str(resolve_artifacts_root(artifacts_root)),
                            fresh=fresh, since_ms=since_ms, scales_file=scales_file if scales else None))
    return jobs


def _model_of(row) -> dict:
    from backbones import resolve_variant
    return {"arch": row.arch, "rep": row.rep, "variant": resolve_variant(row.rep, row.variant).as_dict()}


def _plan_dense(table, scale, seeds, rows, data_root, db_url, executor, devices, artifacts_root, fresh, since_ms,
                pretrained: dict[str, dict]) -> list[Job]:
    """The jobs of a dense table (runners/dense.py): per row and seed, the row's mm config and backbone, the batch
    arithmetic of its stock config on ``devices``, the group's baseline (re-measured beside it for the cost ratios)
    and the checkpoint its backbone starts from (its sha256 and the run it came from: the lineage; not its path)."""
    from .dense import batch_plan as dense_batch_plan
    jobs = []
    for row in rows:
        recipe = table.recipe(scale, row)
        grows = recipe.dyrep_every is not None and row.dyrep is not None  # DyRep during the finetuning
        baseline = table.baseline_of(row)
        given = pretrained.get(row.name)
        for seed in range(seeds):
            config = {
                "table": table.key, "row": row.name, "scale": scale, "seed": seed, **_model_of(row),
                "baseline": {"row": baseline, **_model_of(table.row(baseline))} if baseline else None,
                "dense": {"config": row.config, "freeze": row.freeze,
                          **({"cfg_options": row.cfg_options} if row.cfg_options else {})},
                "recipe": recipe.as_dict(), **dense_batch_plan(recipe, row.config, devices, row.cfg_options),
                "metrics": list(table.metrics),
                "code": code_fingerprint(),
                **({"pretrained": {k: v for k, v in given.items() if k != "path"}} if given else {}),
                **({"dyrep": row.dyrep.as_dict()} if grows else {}),
            }
            chash = config_hash({k: v for k, v in config.items() if k != "seed"})
            spec = RunSpec(run_key(table.key, row.name, scale, seed, chash), table.key, row.name, scale, seed, chash,
                           config)
            jobs.append(Job(spec, config, data_root, db_url, executor,
                            artifacts_root=str(resolve_artifacts_root(artifacts_root)), fresh=fresh,
                            since_ms=since_ms, pretrained_file=given["path"] if given else None))
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
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    cuda = torch.cuda.is_available()
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "mmcv": mmcv_version, "device_name": device_name(device), "host": socket.gethostname(),
            "platform": platform.platform(), **_versions("torchvision", "mmengine", "numpy"),
            "cudnn": str(torch.backends.cudnn.version()) if cuda and torch.backends.cudnn.is_available() else None,
            "driver": _nvidia_driver() if cuda else None, "gpu_count": torch.cuda.device_count() if cuda else 0,
            "cpu_affinity": _ranges(sorted(os.sched_getaffinity(0))),
            "command": os.environ.get(COMMAND_ENV) or mask_url(" ".join(sys.argv)),
            "uv_lock_sha256": _sha256(repo / "uv.lock")}


COMMAND_ENV = "REPBENCH_COMMAND"  # run_suite puts its command line (password masked) here for its workers


def _versions(*packages: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.split("\n")[0].strip() or None if done.returncode == 0 else None


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str | None:
    return sha256_of(path) if path.exists() else None


def execute(job: Job, slurm_job_id: str | None = None) -> str:
    """Run one job as this process's share of it and record everything through the store. Returns the final
    status, or ``held`` when the run was not this worker's to take (another live worker holds it, or it is done).

    Launcher-agnostic: the process's rank comes from the environment (runners/launch.py). Rank 0 claims the run
    (runners/claims.py) and keeps the claim by a heartbeat, runs the cost probes (in seed 0's run) and records the
    run; every rank trains; only rank 0 writes metrics and artifacts, and every write holds only while the claim
    does. Any rank that fails marks the run failed (the launcher stops the others; collectives time out rather than
    hang).
    """
    import contextlib

    import torch

    from suites import Recipe
    from .claims import Heartbeat, lease_seconds
    from .launch import DistEnv, cpus_available, destroy_process_group, init_process_group

    dist = DistEnv.from_env()
    store = Store(job.db_url, migrate=False)
    run_id = job.run_id if job.run_id is not None else store.ensure_run(job.spec).id
    claim = None
    try:
        device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
        threads = max(1, cpus_available() // (1 if os.environ.get("SLURM_CPUS_PER_TASK") else dist.local_world_size))
        torch.set_num_threads(threads)
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for data workers; MMEngine would force 1
            os.environ.setdefault(variable, str(threads))
        init_process_group(dist, device)
        if dist.is_main:
            if slurm_job_id:  # a requeued job: its earlier incarnation (same job id) is certainly gone
                store.expire_lease_of_job(run_id, slurm_job_id)
            claim = store.claim(run_id, lease_s=lease_seconds(), host=socket.gethostname(), pid=os.getpid(),
                                executor=job.executor, slurm_job_id=slurm_job_id, since_ms=job.since_ms,
                                force=job.fresh)
        if dist.distributed:
            box = [claim]
            torch.distributed.broadcast_object_list(box, src=0)
            claim = box[0]
        if claim is None:
            return "held"
        with Heartbeat(job.db_url, claim) if dist.is_main else contextlib.nullcontext():
            run_dir = job.run_dir
            if dist.is_main and job.fresh and run_dir.exists():
                shutil.rmtree(run_dir)
                store.remove_artifacts(run_id, owner=claim.owner)
            if dist.distributed:
                torch.distributed.barrier()  # nobody reads a checkpoint that --force is removing
            c = job.config
            if c.get("dense"):  # a detection / segmentation row: its own job (runners/dense.py)
                from . import dense
                if dist.is_main:
                    store.log_environment(run_id, environment(device), owner=claim.owner)
                status = dense.execute(store, claim, job, device, dist)
                if dist.is_main:
                    store.finish_run(run_id, status, claim=claim, attempt_status=status)
                return status
            if c.get("published"):  # an official checkpoint, evaluated (runners/evaluate.py): nothing trains
                from . import evaluate
                if dist.is_main:
                    store.log_environment(run_id, environment(device), owner=claim.owner)
                evaluate.execute(store, claim, job, device, dist)
                if dist.is_main:
                    store.finish_run(run_id, "finished", claim=claim, attempt_status="finished")
                return "finished"
            recipe = Recipe.from_dict(c["recipe"])
            if c.get("measures"):  # another run's final weights, measured (quantization tables): nothing trains
                if dist.is_main:
                    store.log_environment(run_id, environment(device), owner=claim.owner)
                    _measure_weights(store, claim, job, _upstream_model(store, claim, job), recipe, float_top1=True,
                                     device=device)
                    store.finish_run(run_id, "finished", claim=claim, attempt_status="finished")
                return "finished"
            trains = "top1" in c["metrics"] and recipe.train_accuracy
            model = None
            fixed = _structure_events(store, job) if c.get("structure") else []  # a structure another run grew
            if dist.is_main:
                store.log_environment(run_id, environment(device), owner=claim.owner)
                if c["seed"] == 0:  # costs do not depend on the seed: measured once per row (their spread comes
                    # from the probes' repeated, interleaved steps), in seed 0's run
                    model = _measure_costs(store, claim, job, recipe, device, keep_initial=trains, structure=fixed)
            outcome = Outcome("finished")
            if trains:
                if model is None:  # the other ranks build it with the same seed (DDP broadcasts rank 0's anyway)
                    model = _seeded_build(c["seed"], c["arch"], c["rep"], c["num_classes"], c["variant"], fixed)
                if c.get("scales"):
                    _apply_scales(store, claim, job, model, dist)
                outcome = _train(store, claim, job, model, recipe, device, dist, fixed)
            if dist.is_main:
                run_status = "scheduled" if outcome.status == "preempted" else outcome.status
                store.finish_run(run_id, run_status, error=outcome.error, diverged_step=outcome.diverged_step,
                                 claim=claim, attempt_status=outcome.status)
                if outcome.status == "preempted" and outcome.signum == signal.SIGUSR2 and slurm_job_id:
                    _requeue(slurm_job_id)  # Slurm's pre-timeout (or preemption) signal: come back and resume
        return outcome.status
    except LeaseLost as e:
        print(f"repbench worker: {job.label}: {e}", file=sys.stderr, flush=True)
        return "lost"
    except Exception as e:  # noqa: BLE001 - any failure of one job is recorded, the others go on
        where = f" (rank {dist.rank} of {dist.world_size})" if dist.distributed else ""
        error = f"{type(e).__name__}{where}: {e}"
        print(f"repbench worker: {job.label}: failed: {error}", file=sys.stderr, flush=True)
        if claim is not None:
            try:
                store.finish_run(run_id, "failed", error=error, traceback=traceback.format_exc(), claim=claim)
            except Exception as db:  # noqa: BLE001 - the database itself may be what failed
                print(f"repbench worker: {job.label}: cannot record the failure ({type(db).__name__}: "
                      f"{error_reason(db)}); the run stays claimed until its lease expires, then it is retried",
                      file=sys.stderr, flush=True)
        return "failed"
    finally:
        destroy_process_group()
        store.close()


@dataclass
class Outcome:
    """How a training run ended: a status (finished, diverged, failed, preempted), and what goes with it."""

    status: str
    error: str | None = None
    diverged_step: int | None = None
    signum: int | None = None


def _requeue(slurm_job_id: str) -> None:
    """Put this Slurm job back in the queue (as submitit does for checkpointable jobs); the requeued job claims
    the run again and resumes from the checkpoint just written."""
    done = subprocess.run(["scontrol", "requeue", slurm_job_id], capture_output=True, text=True, timeout=60)
    if done.returncode:
        print(f"repbench worker: scontrol requeue {slurm_job_id} failed: {done.stderr.strip()}", file=sys.stderr,
              flush=True)


def _seeded_build(seed: int, arch: str, rep: str, num_classes: int, variant, structure: list | None = None):
    """The row's model with its initial weights drawn from the run's seed, whatever ran before; ``structure``: the
    events of a grown structure replayed on it (runners/dyrep.py)."""
    import torch

    from backbones import build_classifier
    torch.manual_seed(seed)
    model = build_classifier(arch, rep, num_classes, variant)
    if structure:
        from .dyrep import replay
        replay(model, structure)
    return model


def _finished_upstream(store: Store, job: Job, run_key: str, what: str, poll_s: float = 10.0):
    """The finished run ``run_key`` this row consumes (its ``what``: scales, structure). While another worker runs it
    (a Slurm array runs rows side by side) this waits; a failed or diverged source fails the row."""
    said = False
    while True:
        run = store.get_run(run_key)
        if run is None:
            raise RuntimeError(f"its {what} source run {run_key[:12]} is not in the database (run_suite plans it with "
                               "the row: run the row's table again)")
        if run.status == "finished":
            return run
        if run.status in ("failed", "diverged"):
            raise RuntimeError(f"its {what} source, run {run.id} ({run.row_name}), {run.status}: no {what} to use")
        if not said:
            print(f"repbench worker: {job.label}: waiting for its {what} source, run {run.id} ({run.row_name}, "
                  f"{run.status})", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)


def _upstream_scales(store: Store, job: Job, run_key: str) -> tuple[Path, int, str]:
    """The scales file of the finished Hyper-Search run ``run_key`` (path, size, sha256, verified)."""
    run = _finished_upstream(store, job, run_key, "scales")
    files = store.artifacts_frame(run.id)
    files = files[files.kind == "scales"]
    if files.empty:
        raise RuntimeError(f"its scales source, run {run.id} ({run.row_name}), recorded no scales file")
    path, size, sha = Path(files.path.iloc[-1]), int(files.size_bytes.iloc[-1]), files.sha256.iloc[-1]
    if _sha256(path) != sha:
        raise RuntimeError(f"the scales file {path} of run {run.id} ({run.row_name}) is missing or changed "
                           f"since it was recorded (sha256 {sha[:12]})")
    return path, size, sha


def _structure_events(store: Store, job: Job) -> list:
    """The structure events of the row's source run up to the row's epoch (DyRep Table 7's "DyRep-N": the structure
    after N epochs), dated before this run's first epoch: the network it trains, fixed."""
    from .dyrep import Event
    s = job.config["structure"]
    run = _finished_upstream(store, job, s["run_key"], "structure")
    frame = store.events_frame(run_id=run.id)
    return [Event(-1, kind, site, list(branches)) for epoch, kind, site, branches
            in zip(frame.epoch, frame.kind, frame.site, frame.branches) if epoch < s["epoch"]]


def _apply_scales(store: Store, claim, job: Job, model, dist) -> None:
    """A RepOpt target's constants and initial kernels, as the row's Scales say (suites.Scales): searched scales (or
    their channel means) from the Hyper-Search run's file, recorded as this run's ``input_scales`` artifact (the
    lineage); all ones; or the HS model's initial scales. Then the Rule of Initialization (``reinit``; seeded by the
    run's seed) or the constants alone. Every rank does the same (the file is on the shared artifacts root)."""
    import torch

    from backbones import build_classifier
    from backbones.repopt import ablated_scales, load_scales, reinitialize, scales_of, set_constants, target_blocks

    c, s = job.config, job.config["scales"]
    if s.get("run_key") or s.get("file_sha256"):
        if s.get("file_sha256"):  # run_suite --scales
            path = Path(job.scales_file or "")
            sha = _sha256(path) if path.is_file() else None
            if sha != s["file_sha256"]:
                raise RuntimeError(f"the scales file {path} is missing or changed since the run was planned "
                                   f"(sha256 {s['file_sha256'][:12]})")
            size = path.stat().st_size
        else:
            path, size, sha = _upstream_scales(store, job, s["run_key"])
        scales = load_scales(path)
        if dist.is_main:
            store.log_artifact(claim.run_id, "input_scales", str(path), size, sha, None, owner=claim.owner)
        if s["how"] == "channel_mean":
            scales = ablated_scales(scales, "channel_mean")
    elif s["how"] == "hs_init":
        scales = scales_of(build_classifier(c["arch"], "hs", c["num_classes"]))
    else:
        scales = ablated_scales(scales_of(build_classifier(c["arch"], "hs", c["num_classes"])), "ones")
    if s["reinit"]:
        reinitialize(model, scales, s["identity"], torch.Generator().manual_seed(c["seed"]))
    else:
        for block, block_scales in zip(target_blocks(model), scales, strict=True):
            set_constants(block, block_scales)


def _measure_costs(store: Store, claim, job: Job, recipe, device: str, keep_initial: bool = False,
                   structure: list | None = None):
    """The cost probes (runners/probes.py, compare_costs) on rank 0, before training: the row's model and its group's
    baseline model in this one process, interleaved, with the row's ratios to the baseline; the machine's load while
    timing. Each model is built once; ``keep_initial``: returns a copy of the row's model as built (the training run
    starts from it)."""
    import copy

    from backbones import deploy
    from . import probes

    c = job.config
    build = functools.partial(_seeded_build, c["seed"], num_classes=c["num_classes"])
    row = c["row"]
    factories = {row: functools.partial(build, c["arch"], c["rep"], variant=c["variant"], structure=structure)}
    baseline = c["baseline"]["row"] if c["baseline"] else None
    if baseline and baseline != row:
        b = c["baseline"]
        factories[baseline] = functools.partial(build, b["arch"], b["rep"], variant=b["variant"])
    wanted = tuple(p for p in ("train_memory", "time_per_batch") if p in c["metrics"]) + ("params_macs", "inference")
    if "train_speed" in c["metrics"]:  # derived from the timed steps
        wanted += ("time_per_batch", "train_speed")
    if "max_batch_size" in c["metrics"]:
        wanted += ("max_batch_size",)
    setting = probes.CostSetting(recipe.cost_batch, recipe.cost_resolution, c["num_classes"], device,
                                 recipe.cost_warmup, recipe.cost_steps, recipe.memory_cap_gb, recipe.latency_batch,
                                 recipe.throughput_batch, max_batch_cap_gb=recipe.max_batch_cap_gb,
                                 max_batch_high=recipe.max_batch_high, macs_resolution=_counting_resolution(c, recipe))
    initial = {}

    def keep(name, model):
        if keep_initial and name == row:
            initial[name] = copy.deepcopy(model)

    results, load = probes.compare_costs(factories, baseline, setting, deploy, wanted, on_built=keep,
                                         forms={row: tuple(c["forms"])} if c.get("forms") else None,
                                         deployed={row: c["deployed"]} if c.get("deployed") else None)
    if device == "cpu" and any(m.endswith("_cpu") for m in c["metrics"]):  # a table with CPU columns (RepNeXt T6)
        for m in results[row]:
            m.name = probes.on_cpu(m.name)
            m.extra = {probes.on_cpu(k): v for k, v in m.extra.items()}
    name = probes.device_name(device)
    records = [MetricRecord(m.name, m.value, m.unit, method=m.method, device=name, dtype="float32")
               for m in load.measurements()]
    for m in results[row]:
        where = dict(device=name, dtype="float32", batch=m.batch, resolution=m.resolution, threads=m.threads)
        records.append(MetricRecord(m.name, m.value, m.unit, method=m.method, **where))
        records += [MetricRecord(k, v, m.unit, method=m.method, **where) for k, v in m.extra.items()]
    store.log_metrics(claim.run_id, records, owner=claim.owner)
    if load.busy:
        print(f"repbench worker: {job.label}: warning: the machine was busy: {load.describe()}", file=sys.stderr,
              flush=True)
    return initial.get(row)


def _counting_resolution(c: dict, recipe) -> int:
    """Params and MACs are counted at the paper's (test) resolution whatever the scale: 224 for ImageNet, 32 for
    CIFAR, a row's own where it has one (RepOptimizers Table 3)."""
    import suites
    try:
        table = suites.get_table(c["table"])
    except KeyError:  # a table built outside the suite's registry (a test's or a user's own): its own resolution
        return recipe.test_resolution
    return (table.recipe("paper", table.row(c["row"])) if "paper" in table.recipes else recipe).test_resolution


def _upstream_model(store: Store, claim, job: Job):
    """The train-form model of the finished run the row measures (its final weights, verified by their sha256 and
    recorded as this run's ``input_weights``: the lineage)."""
    from backbones import load_checkpoint
    c = job.config
    run = _finished_upstream(store, job, c["measures"]["run_key"], "weights")
    files = store.artifacts_frame(run.id)
    files = files[files.kind == "weights_train"]
    if files.empty:
        raise RuntimeError(f"its weights source, run {run.id} ({run.row_name}), recorded no final weights")
    path, sha = Path(files.path.iloc[-1]), files.sha256.iloc[-1]
    if _sha256(path) != sha:
        raise RuntimeError(f"the weights {path} of run {run.id} ({run.row_name}) are missing or changed since they "
                           f"were recorded (sha256 {sha[:12]})")
    model = _seeded_build(c["seed"], c["arch"], c["rep"], c["num_classes"], c["variant"])
    load_checkpoint(model, path)
    store.log_artifact(claim.run_id, "input_weights", str(path), path.stat().st_size, sha, None, owner=claim.owner)
    return model


def _measure_weights(store: Store, claim, job: Job, model, recipe, float_top1: bool = False,
                     device: str = "cpu") -> None:
    """The quantization metrics (runners/quant.py) of a trained model, where the table asks for them (QAT
    finetunes on ``device``; INT8 runs on the CPU)."""
    from .quant import QUANT_METRICS, measure_trained
    if set(QUANT_METRICS + ("top1_qat",)) & set(job.config["metrics"]):
        store.log_metrics(claim.run_id, measure_trained(model, job.config, recipe, Path(job.data_root), device,
                                                         float_top1=float_top1), owner=claim.owner)


def _training_costs(store: Store, claim, job: Job, recipe, result, events: list, grown: bool,
                    context: dict) -> None:
    """What the training run itself cost, where the table asks: ``train_hours`` (wall time of the epochs x the
    processes: device hours) and the averages over epochs of the training-form network's params and MACs (DyRep's
    structure changes while it trains: rebuilt from its events; a fixed network: its own counts)."""
    c = job.config
    records = []
    if "train_hours" in c["metrics"]:
        seconds = sum(e["seconds"] for e in result.epochs)
        records.append(MetricRecord("train_hours", seconds * c["world_size"] / 3600, "h",
                                    method=f"wall time of {len(result.epochs)} epoch(s) x {c['world_size']} "
                                           "process(es), validation excluded", **context))
    if {"params_avg", "macs_avg"} & set(c["metrics"]):
        from backbones import build_classifier
        from .dyrep import average_costs
        size = _counting_resolution(c, recipe)
        params, macs = average_costs(lambda: build_classifier(c["arch"], c["rep"], c["num_classes"], c["variant"]),
                                     events, recipe.epochs, size)
        how = (f"training form, averaged over {recipe.epochs} epoch(s)"
               + (f" of the structure rebuilt from {len(events)} event(s)" if grown else ""))
        records += [MetricRecord("params_avg", params, "params", method=how),
                    MetricRecord("macs_avg", macs, "MACs", method=f"{how}; batch 1, {size}x{size}", batch=1,
                                 resolution=size)]
    if records:
        store.log_metrics(claim.run_id, records, owner=claim.owner)


def _train(store: Store, claim, job: Job, model, recipe, device: str, dist, fixed: list | None = None) -> Outcome:
    """The accuracy run: per-epoch top-1 and loss stored with their step, checkpoints and final weights recorded as
    artifacts (rank 0; every rank holds the claim, broadcast by rank 0)."""
    import copy

    import torch

    from backbones import deploy, save_checkpoint
    from backbones.repopt import csla_blocks, save_scales, scales_of
    from . import probes
    from .train import Diverged, Preempted, checkpoints_in, train_classifier

    c = job.config
    run_dir = job.run_dir
    run_id, owner = claim.run_id, claim.owner
    context = dict(device=probes.device_name(device), dtype="float32", threads=torch.get_num_threads(),
                   batch=c["global_batch"], resolution=recipe.resolution)
    how = (f"{c['world_size']} process(es) x {c['grad_accum']} micro-batch(es) x {c['per_device_batch']} = global "
           f"batch {c['global_batch']}, lr {lr_text(c, recipe)}")
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
        store.log_metrics(run_id, owner=owner, records=[
            MetricRecord("top1", record["top1"], "%", step=record["step"], method=method, **context),
            MetricRecord("train_loss", record["train_loss"], "nats", step=record["step"],
                         method=f"mean cross-entropy of epoch {record['epoch']} over all processes", **context),
            *([MetricRecord("epoch_hours", record["seconds"] * c["world_size"] / 3600, "h", step=record["step"],
                            method=f"wall time of epoch {record['epoch']} x {c['world_size']} process(es), "
                                   "validation excluded (DyRep's cost grows with the structure)", **context)]
              if "train_hours" in c["metrics"] else [])])

    def on_checkpoint(kind, path, size, sha, epoch):
        if kind == "removed":
            store.remove_artifacts(run_id, path=str(path), owner=owner)
        else:
            store.log_artifact(run_id, kind, str(path), size, sha, epoch, owner=owner)

    def record_log() -> None:
        if dist.is_main and log_file.is_file():
            store.log_artifact(run_id, "log", str(log_file), log_file.stat().st_size, sha256_of(log_file), None,
                               owner=owner)

    hooks, dyrep = [], None
    if c.get("dyrep"):  # the plain network grows while it trains; every change stored as an event of the run
        from .dyrep import DyRepHook
        d = c["dyrep"]

        def on_events(events):
            store.log_events(run_id, [asdict(e) for e in events], owner=owner)
            for e in events:
                log(f"DyRep after epoch {e.epoch + 1}: {e.kind} {e.site} {' '.join(e.branches)}")

        dyrep = DyRepHook(recipe.dyrep_interval, recipe.dyrep_max_epoch, d["metric"], d["rule"], d["gamma"],
                          d["recal_batches"], c["seed"], d["dep"], on_events if dist.is_main else None,
                          module="net", ops=d.get("ops", "dyrep"))  # train.py's ImageClassifier holds the network as .net
        hooks.append(dyrep)
    try:
        result = train_classifier(model, recipe, Path(job.data_root), c["seed"], device, dist, c["grad_accum"],
                                  run_dir, log, on_epoch if dist.is_main else None, on_checkpoint,
                                  repoptimizer=bool(c.get("scales") and c["scales"]["grad_mult"]),
                                  optimizer=c.get("optimizer"), hooks=hooks)
    except Diverged as e:
        if dist.is_main:
            log(f"diverged: {e}")
            store.log_metrics(run_id, owner=owner, records=[
                MetricRecord("top1", float("nan"), "%", step=e.step, method=f"diverged: {e}", **context)])
        record_log()
        return Outcome("diverged", str(e), e.step)
    except Preempted as e:
        if dist.is_main:
            log(f"preempted: {e}")
        record_log()
        return Outcome("preempted", f"preempted: {e}; the next attempt resumes from the checkpoint",
                       signum=e.signum)
    except Exception:
        record_log()
        raise
    if not dist.is_main:
        return Outcome("finished")
    if csla_blocks(model):  # a Hyper-Search model: its trained scales are what RepOpt rows consume
        run_dir.mkdir(parents=True, exist_ok=True)
        path = save_scales(scales_of(model), run_dir / "scales.pth")
        store.log_artifact(run_id, "scales", str(path), path.stat().st_size, sha256_of(path), recipe.epochs,
                           owner=owner)
    for record in result.epochs:  # epochs trained before a resume: their metrics were cleared with the retry
        on_epoch(record)
    _measure_weights(store, claim, job, model, recipe, device=device)  # quantization: PTQ, QAT, kernel statistics
    events = (fixed or []) + (dyrep.dyrep.events if dyrep else [])  # the structure's changes, from the plain net
    _training_costs(store, claim, job, recipe, result, events, dyrep is not None or bool(fixed), context)
    if recipe.checkpoints:
        for form, weights in (("weights_train", model), ("weights_deploy", deploy(copy.deepcopy(model).eval()))):
            # a grown (DyRep) network's train form: the structure events it needs before a strict load
            grown = {"events": [asdict(e) for e in events]} if form == "weights_train" and events else {}
            path = save_checkpoint(weights, run_dir / f"{form.replace('_', '-')}.pth", table=c["table"],
                                   row=c["row"], scale=c["scale"], seed=c["seed"], variant=c["variant"], **grown)
            store.log_artifact(run_id, form, str(path), path.stat().st_size, sha256_of(path), recipe.epochs,
                               owner=owner)
        # The training-state checkpoints only serve a resume: once the final weights are recorded they go (a mini
        # table4 would otherwise keep ~1 GB of optimizer state per run, tens of GB for the table).
        for state in checkpoints_in(run_dir / "checkpoints"):
            state.with_name(state.name + ".sha256").unlink(missing_ok=True)
            state.unlink(missing_ok=True)
            store.remove_artifacts(run_id, path=str(state), owner=owner)
    log(f"finished: top-1 {result.top1:.2f}%  loss {result.train_loss:.4f}  ({result.iters} optimizer steps)")
    record_log()
    return Outcome("finished")
