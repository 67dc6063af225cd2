"""Accuracy: a classification training run through MMEngine's Runner, on one or many processes.

The recipe follows the OREPA code (train.py): SGD momentum 0.9, weight decay 1e-4 except on biases and BN
parameters (the OREPA scaling vectors *are* decayed), lr x2 on every parameter whose name contains "bias" (BN biases
included, as the official code's name test does), linear warm-up then cosine to 0, stepped per optimizer step.

Multi-device: one process per device joined in a process group (runners/launch.py), the model wrapped in DDP with
per-device BN; a run on fewer devices than its recipe keeps the global batch by gradient accumulation. The training
order is one permutation per epoch shared by every process, cut into global batches; each process reads its own
micro-batches of each (``StepSampler``), so N processes x A accumulated micro-batches see exactly the images the
paper's devices would. Validation shards the validation set without counting a padded sample.

Checkpoints (``run_dir`` given and the recipe asks for them): one at the end of every epoch (after its validation)
and one on SIGTERM / SIGUSR2 (Slurm's pre-timeout signal) at the next optimizer-step boundary, written atomically with
a sha256 sidecar; a re-run resumes from the newest one that verifies, restoring model, optimizer, schedulers,
epoch/iteration, RNG states and the sampler position. A non-finite loss stops the run as *diverged* at that step
(OREPA Table 3 reports such a run as "NaN").
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dataset import DefaultSampler
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, MMDistributedDataParallel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

import backbones.mm  # noqa: F401 - repbench's RepOptimizers in MMEngine's registries (scope repbench)
from .data import build_datasets
from .jobs import sha256_of
from .launch import DistEnv, loader_settings

STATE_FORMAT = "repbench-train-state-v1"
KEEP_CHECKPOINTS = 2  # the newest and one to fall back on


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class Preempted(RuntimeError):
    """Training stopped on SIGTERM / SIGUSR2 after writing a checkpoint; a re-run (or a requeued job) resumes.
    ``signum``: the signal this process received (None when a peer's signal stopped the group)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class ImageClassifier(BaseModel):
    """MMEngine wrapper: ``loss`` -> cross-entropy (with the recipe's label smoothing), ``predict`` -> one
    (prediction == label) flag per image, so that the evaluator can drop the padding of a sharded validation set."""

    def __init__(self, net: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.net, self.label_smoothing = net, label_smoothing

    def forward(self, inputs, labels=None, mode="tensor"):
        logits = self.net(inputs.to(next(self.net.parameters()).dtype))  # a float64 net (tests) gets float64 images
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)}
        if mode == "predict":
            return list((logits.argmax(1) == labels).cpu())
        return logits


class Top1(BaseMetric):
    """Top-1 over exactly the validation set: one result per image; MMEngine's collection truncates the padded
    tail of the last shard (``size`` = the dataset's length)."""

    default_prefix = ""

    def process(self, data_batch, data_samples):
        self.results.extend(bool(flag) for flag in data_samples)

    def compute_metrics(self, results):
        return {"top1": 100.0 * sum(results) / max(len(results), 1), "val_images": len(results)}


class StepSampler(Sampler):
    """This process's share of the training order: per epoch one permutation (seeded by seed + epoch, identical in
    every process) cut to whole global batches of ``world * accum * batch`` images; global batch ``s`` is split into
    ``world * accum`` micro-batches and process ``rank`` reads micro-batches ``a * world + rank`` for a = 0..accum-1.
    ``resume_at(epoch, micro)`` skips the micro-batches already trained in that epoch without loading them."""

    def __init__(self, size: int, batch: int, world: int, rank: int, accum: int, seed: int,
                 max_steps: int | None = None):
        self.size, self.batch, self.world, self.rank, self.accum, self.seed = size, batch, world, rank, accum, seed
        self.global_batch = batch * world * accum
        self.steps = size // self.global_batch if max_steps is None else min(size // self.global_batch, max_steps)
        if self.steps < 1:
            raise ValueError(f"{size} training images do not fill one global batch of {self.global_batch}")
        self.epoch, self._resume = 0, (None, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, micro: int) -> None:
        self._resume = (epoch, micro)

    def _skip(self) -> int:
        epoch, micro = self._resume
        return micro if epoch == self.epoch else 0

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        skip = self._skip()
        micro = 0
        for step in range(self.steps):
            chunk = order[step * self.global_batch:(step + 1) * self.global_batch]
            for a in range(self.accum):
                if micro >= skip:
                    m = a * self.world + self.rank
                    yield from chunk[m * self.batch:(m + 1) * self.batch]
                micro += 1
        self._resume = (None, 0)

    def __len__(self):
        return (self.steps * self.accum - self._skip()) * self.batch


@dataclass
class TrainResult:
    top1: float
    train_loss: float
    iters: int                    # optimizer steps
    val_images: int
    epochs: list[dict] = field(default_factory=list)  # per epoch: epoch, step, train_loss, top1, seconds


# -- checkpoints -------------------------------------------------------------------------------------------------

def _atomic_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_checkpoint(state: dict, folder: Path, name: str) -> tuple[Path, int, str]:
    """Write ``state`` as ``folder/name`` atomically, then its ``.sha256`` sidecar (a checkpoint without one is
    incomplete). Returns (path, size, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    _atomic_save(state, path)
    sha = sha256_of(path)
    sidecar = path.with_name(path.name + ".sha256")
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(f"{sha}  {path.name}\n")
    os.replace(tmp, sidecar)
    return path, path.stat().st_size, sha


def checkpoints_in(folder: Path) -> list[Path]:
    """Checkpoint files, newest first (names sort by epoch and step)."""
    return sorted(folder.glob("state-*.pth"), reverse=True) if folder.is_dir() else []


def latest_verified_checkpoint(folder: Path, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint whose sha256 matches its sidecar and that loads; each one skipped is warned about."""
    for path in checkpoints_in(folder):
        sidecar = path.with_name(path.name + ".sha256")
        if not sidecar.is_file():
            warn(f"checkpoint {path.name} has no sha256 record (interrupted while writing?); trying an older one")
            continue
        expected = sidecar.read_text().split()[0]
        actual = sha256_of(path)
        if actual != expected:
            warn(f"checkpoint {path.name} is corrupt or truncated (sha256 {actual[:12]} != recorded "
                 f"{expected[:12]}); falling back to an older one")
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back
            warn(f"checkpoint {path.name} cannot be read ({type(e).__name__}); falling back to an older one")
            continue
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
            return path, state
        warn(f"checkpoint {path.name} is not a repbench training state; skipped")
    return None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- hooks -------------------------------------------------------------------------------------------------------

class OptimizerStepScheduler(Hook):
    """Steps the lr schedulers once per *optimizer* step, so that gradient accumulation never changes the schedule
    (MMEngine's ParamSchedulerHook steps them per micro-batch)."""

    priority = "LOW"

    def __init__(self, accum: int):
        self.accum = accum

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if (runner.iter + 1) % self.accum == 0:
            for scheduler in runner.param_schedulers:
                scheduler.step()


class TrainState(Hook):
    """Divergence, per-epoch records, checkpoints, preemption and resume of one training run."""

    priority = "VERY_LOW"

    def __init__(self, dist: DistEnv, accum: int, steps_per_epoch: int, folder: Path | None,
                 resume: dict | None, report: Callable[[dict], None], on_checkpoint: Callable | None,
                 stateful: list | None = None):
        # stateful: hooks whose state the checkpoints carry (checkpoint_state() / restore(state, runner), restored
        # before the weights: DyRep's structure)
        self.stateful = stateful or []
        self.dist, self.accum, self.steps_per_epoch = dist, accum, steps_per_epoch
        self.folder, self.resume, self.report, self.on_checkpoint = folder, resume, report, on_checkpoint
        self.history: list[dict] = list(resume["history"]) if resume else []
        self.loss_sum, self.loss_count = 0.0, 0
        self.epoch_start = time.perf_counter()
        self.signal_received = False
        self._previous_handlers = {}

    # signals: remember, act at the next optimizer-step boundary (all processes agree, then stop together)
    def _on_signal(self, signum, frame):
        self.signal_received = signum

    def before_train(self, runner):
        if self.folder is not None:
            for signum in (signal.SIGTERM, signal.SIGUSR2):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        if self.resume is None:
            return
        state = self.resume
        for hook, hook_state in zip(self.stateful, state.get("hooks", []), strict=True):
            hook.restore(hook_state, runner)
        _unwrap(runner.model).load_state_dict(state["model"])
        runner.optim_wrapper.load_state_dict(state["optimizer"])
        for scheduler, scheduler_state in zip(runner.param_schedulers, state["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        loop = runner.train_loop
        loop._epoch, loop._iter = state["epoch"], state["iter"]
        runner.optim_wrapper._inner_count = state["iter"]
        loop.dataloader.sampler.resume_at(state["epoch"], state["micro_in_epoch"])
        _set_rng_state(state["rng"])
        self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]

    def after_train(self, runner):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def before_train_epoch(self, runner):
        self.epoch_start = time.perf_counter()
        if self.resume is None or self.resume["epoch"] != runner.epoch:
            self.loss_sum, self.loss_count = 0.0, 0
        else:
            self.epoch_start -= self.resume["epoch_seconds"]
            self.resume = None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        loss = float(outputs["loss"].detach())
        step = (runner.iter + 1) // self.accum
        if not math.isfinite(loss):
            raise Diverged(math.ceil((runner.iter + 1) / self.accum), loss)
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        if self.folder is None or (runner.iter + 1) % self.accum:
            return
        stop = bool(self.signal_received)
        if self.dist.distributed:
            flag = torch.tensor([1.0 if stop else 0.0], device=_device_of(runner))
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            micro = (step - runner.epoch * self.steps_per_epoch) * self.accum
            name = self.save(runner, runner.epoch, runner.iter + 1, micro, time.perf_counter() - self.epoch_start)
            signum = self.signal_received or None
            what = signal.Signals(signum).name if signum else "a peer's signal"
            raise Preempted(f"stopped by {what} at step {step} (epoch {runner.epoch + 1}, checkpoint {name})",
                            signum)

    def after_val_epoch(self, runner, metrics=None):
        seconds = time.perf_counter() - self.epoch_start
        loss_sum, count = self.loss_sum, self.loss_count
        if self.dist.distributed:
            totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=_device_of(runner))
            torch.distributed.all_reduce(totals)
            loss_sum, count = totals.tolist()
        epoch = runner.epoch  # already advanced past the epoch just trained
        record = {"epoch": epoch, "step": epoch * self.steps_per_epoch, "train_loss": loss_sum / max(count, 1),
                  "top1": float(metrics["top1"]), "val_images": int(metrics["val_images"]), "seconds": seconds}
        self.history.append(record)
        self.report(record)
        if self.folder is not None:  # the last epoch too: a re-run after a crash here does not train again
            self.save(runner, epoch, runner.iter, 0, 0.0)

    def save(self, runner, epoch: int, iteration: int, micro: int, epoch_seconds: float) -> str:
        """Rank 0 writes the training state; every process waits for it (so a stop never leaves it half-written)."""
        name = f"state-e{epoch:04d}-s{iteration // self.accum:09d}.pth"
        if self.dist.is_main:
            state = {"format": STATE_FORMAT, "model": _unwrap(runner.model).state_dict(),
                     "optimizer": runner.optim_wrapper.state_dict(),
                     "schedulers": [s.state_dict() for s in runner.param_schedulers],
                     "epoch": epoch, "iter": iteration, "micro_in_epoch": micro, "epoch_seconds": epoch_seconds,
                     # the running loss of a partly trained epoch; an epoch-end state starts the next at zero
                     "loss_sum": self.loss_sum if micro else 0.0, "loss_count": self.loss_count if micro else 0,
                     "history": self.history,
                     "hooks": [hook.checkpoint_state() for hook in self.stateful],
                     "rng": _rng_state()}
            path, size, sha = write_checkpoint(state, self.folder, name)
            for old in checkpoints_in(self.folder)[KEEP_CHECKPOINTS:]:
                old.unlink(missing_ok=True)
                old.with_name(old.name + ".sha256").unlink(missing_ok=True)
                if self.on_checkpoint:
                    self.on_checkpoint("removed", old, 0, "", None)
            if self.on_checkpoint:
                self.on_checkpoint("checkpoint", path, size, sha, epoch)
        if self.dist.distributed:
            torch.distributed.barrier()
        return name


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, MMDistributedDataParallel) else model


def _device_of(runner) -> torch.device:
    return next(_unwrap(runner.model).parameters()).device


ADAPTIVE = {"rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW", "adafactor": "TorchAdafactor"}  # MMEngine's names


def optim_wrapper_cfg(recipe, grad_accum: int = 1, repoptimizer: bool = False, optimizer: str | None = None) -> dict:
    """SGD as the recipe says, accumulating ``grad_accum`` micro-batches per step (``recipe.decay_all``: weight decay
    on every parameter, no other rule). OREPA's code: every parameter whose
    name contains "bias" gets lr x2 and no decay, BN weights no decay, everything else (scaling vectors included) is
    decayed; mmengine's own ``bias_lr_mult`` would skip the BN biases (``bias_lr_mult_norm=False`` selects it).
    ``recipe.decay_1d=False``: no 1-D parameter decayed (RepOptimizers' code). ``repoptimizer``: the RepOptimizer
    (SGD with the Grad Mults of the model's RepOpt blocks, backbones/repopt.py) through its MMEngine constructor,
    which refuses gradient clipping. ``optimizer``: a row's adaptive optimizer instead of SGD (suites.OPTIMIZERS:
    torch's defaults, ``recipe.adaptive_lr``, the recipe's weight decay and paramwise rules); with ``repoptimizer``
    only ``adamw`` (the RepOptimizer's AdamW form, Grad Mults of power 1)."""
    if recipe.decay_all:  # one rule for every parameter (DyRep's CIFAR recipe)
        if recipe.bias_lr_mult != 1.0:
            raise ValueError("decay_all is one rule for every parameter: the bias lr multiplier must be 1")
        paramwise = {}
    else:
        paramwise = dict(norm_decay_mult=0.0, bias_decay_mult=0.0)
        if not recipe.decay_1d:
            paramwise["flat_decay_mult"] = 0.0
        if recipe.bias_lr_mult_norm:
            paramwise["custom_keys"] = {"bias": dict(lr_mult=recipe.bias_lr_mult, decay_mult=0.0)}
        else:
            paramwise["bias_lr_mult"] = recipe.bias_lr_mult
    if optimizer not in (None, "sgd", *ADAPTIVE):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of sgd, {', '.join(ADAPTIVE)}")
    if optimizer in ADAPTIVE:
        if repoptimizer and optimizer != "adamw":
            raise ValueError(f"the RepOptimizer is SGD or AdamW, not {optimizer}")
        settings = dict(type="repbench.RepOptimizerAdamW" if repoptimizer else ADAPTIVE[optimizer],
                        lr=recipe.adaptive_lr, weight_decay=recipe.weight_decay)
    else:
        settings = dict(type="repbench.RepOptimizerSGD" if repoptimizer else "SGD", lr=recipe.lr,
                        momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    return dict(optimizer=settings, accumulative_counts=grad_accum, paramwise_cfg=paramwise,
                **({"constructor": "repbench.RepOptimizerConstructor"} if repoptimizer else {}),
                **({"clip_grad": dict(max_norm=recipe.clip_grad)} if recipe.clip_grad else {}))


# -- the run -----------------------------------------------------------------------------------------------------

def train_classifier(net: nn.Module, recipe, data_root: Path, seed: int = 0, device: str = "cpu",
                     dist: DistEnv | None = None, grad_accum: int = 1, run_dir: Path | None = None,
                     log: Callable[[str], None] | None = None, on_epoch: Callable[[dict], None] | None = None,
                     on_checkpoint: Callable | None = None, repoptimizer: bool = False,
                     optimizer: str | None = None, hooks: list | None = None) -> TrainResult:
    """Train ``net`` with ``recipe`` (suites.Recipe) as process ``dist.rank`` of ``dist.world_size`` (the process
    group already joined), accumulating ``grad_accum`` micro-batches of ``recipe.batch`` per optimizer step.

    ``run_dir``: the run's artifacts folder; with it (and ``recipe.checkpoints``) checkpoints go to
    ``run_dir/checkpoints`` and the run resumes from the newest that verifies. ``log``: progress lines (rank 0).
    ``on_epoch(record)``: after each epoch's validation (rank 0). ``on_checkpoint(kind, path, size, sha256, epoch)``:
    each checkpoint written or removed (rank 0). ``repoptimizer``: train with the RepOptimizer (the model's RepOpt
    blocks carry its constants); ``optimizer``: another optimizer than SGD (optim_wrapper_cfg); ``hooks``: more
    MMEngine hooks (e.g. runners.dyrep.DyRepHook). Raises :class:`Diverged` on a non-finite loss and
    :class:`Preempted` after a signal's checkpoint.
    """
    dist = dist or DistEnv()
    log = log if (log and dist.is_main) else (lambda line: None)
    train_set, val_set = build_datasets(recipe.dataset, data_root, recipe.resolution, recipe.eval_crop,
                                        recipe.eval_resolution, recipe.randaugment)
    global_batch = recipe.batch * dist.world_size * grad_accum
    if recipe.max_iters is not None:  # smoke: a couple of batches are enough to check the plumbing
        train_set = Subset(train_set, range(min(len(train_set), global_batch * recipe.max_iters)))
        val_set = Subset(val_set, range(min(len(val_set), recipe.batch * dist.world_size * 2)))
    sampler = StepSampler(len(train_set), recipe.batch, dist.world_size, dist.rank, grad_accum, seed,
                          recipe.max_iters)
    loader = loader_settings(dist, device, recipe.dataset)
    train_loader = DataLoader(train_set, batch_size=recipe.batch, sampler=sampler, drop_last=True, **loader)
    val_loader = DataLoader(val_set, batch_size=max(recipe.batch, 64), **loader,
                            sampler=DefaultSampler(val_set, shuffle=False, round_up=True))
    steps_per_epoch = sampler.steps
    total = steps_per_epoch * recipe.epochs
    warmup = recipe.warmup_iters or int(round(recipe.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, total - 1)
    schedulers = [dict(type="CosineAnnealingLR", T_max=total - warmup, begin=warmup, end=total, by_epoch=False,
                       eta_min=0.0)]
    if warmup > 0:
        schedulers.insert(0, dict(type="LinearLR", start_factor=1e-3, begin=0, end=warmup, by_epoch=False))
    folder = resume = None
    if run_dir is not None and recipe.checkpoints:
        folder = Path(run_dir) / "checkpoints"
        found = latest_verified_checkpoint(folder, lambda line: log(f"WARNING: {line}"))
        if found is not None:
            path, resume = found
            log(f"resuming from {path.name}: epoch {resume['epoch']} of {recipe.epochs} done"
                + (f", {resume['micro_in_epoch'] // grad_accum} steps into epoch {resume['epoch'] + 1}"
                   if resume["micro_in_epoch"] else ""))
    model = ImageClassifier(net, recipe.label_smoothing).to(device)
    if dist.distributed:
        # torch DDP's defaults, as the official code uses them (buffers synced from rank 0 every forward; MMEngine's
        # own wrapping would turn that off); per-device BN, no SyncBN.
        model = MMDistributedDataParallel(module=model, device_ids=[dist.local_rank] if device.startswith("cuda")
                                          else None)

    started = time.perf_counter()

    def report(record):
        done = record["epoch"]
        elapsed = time.perf_counter() - started
        fresh = done - (resume["epoch"] if resume else 0)
        eta = elapsed / max(fresh, 1) * (recipe.epochs - done)
        log(f"epoch {done}/{recipe.epochs}  loss {record['train_loss']:.4f}  top-1 {record['top1']:.2f}%  "
            f"{record['seconds']:.1f} s  ETA {eta:.0f} s")
        if on_epoch and dist.is_main:
            on_epoch(record)

    hooks = list(hooks or [])
    state_hook = TrainState(dist, grad_accum, steps_per_epoch, folder, resume, report,
                            on_checkpoint if dist.is_main else None,
                            [hook for hook in hooks if hasattr(hook, "checkpoint_state")])
    scratch = None if run_dir is not None else tempfile.TemporaryDirectory(prefix="repbench-run-")
    work_dir = Path(run_dir) if run_dir is not None else Path(scratch.name)
    runner = Runner(
        model=model,
        work_dir=str(work_dir / "mmengine"),
        train_dataloader=train_loader,
        val_dataloader=val_loader,
        val_evaluator=[Top1()],
        train_cfg=dict(by_epoch=True, max_epochs=recipe.epochs, val_interval=1),
        val_cfg=dict(),
        optim_wrapper=optim_wrapper_cfg(recipe, grad_accum, repoptimizer, optimizer),
        param_scheduler=schedulers,
        default_hooks=dict(checkpoint=None, param_scheduler=None,
                           logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=True)),
        custom_hooks=[OptimizerStepScheduler(grad_accum), state_hook, *hooks],
        randomness=dict(seed=seed),
        launcher="pytorch" if dist.distributed else "none",
        env_cfg=dict(cudnn_benchmark=False,
                     mp_cfg=dict(mp_start_method=mp.get_start_method(allow_none=True) or "fork")),
        log_level="ERROR",
        default_scope="mmengine",
        experiment_name=f"repbench-{next(tempfile._get_candidate_names())}",
    )
    if resume is None:
        log(f"training {recipe.epochs} epoch(s) x {steps_per_epoch} steps: {dist.world_size} process(es) x "
            f"{grad_accum} micro-batch(es) x {recipe.batch} = global batch {global_batch}, lr {recipe.lr:g}")
    try:
        runner.train()
    finally:
        if scratch is not None:
            scratch.cleanup()
    last = state_hook.history[-1]
    return TrainResult(top1=last["top1"], train_loss=last["train_loss"], iters=total, val_images=last["val_images"],
                       epochs=state_hook.history)

