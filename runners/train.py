"""Accuracy: a classification training run through MMEngine's Runner.

The recipe follows the OREPA code (train.py): SGD momentum 0.9, weight decay 1e-4 except on biases and BN
parameters (the OREPA scaling vectors *are* decayed), bias learning rate x2, linear warm-up then cosine to 0, per
iteration. A non-finite loss stops the run as *diverged* at that step (OREPA Table 3 reports such a run as "NaN").
"""

from __future__ import annotations

import math
import multiprocessing as mp
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Subset

from .data import build_datasets


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class ImageClassifier(BaseModel):
    """MMEngine wrapper: ``loss`` -> cross-entropy, ``predict`` -> (predictions, labels)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, inputs, labels=None, mode="tensor"):
        logits = self.net(inputs)
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, labels)}
        if mode == "predict":
            return [(logits.argmax(1), labels)]
        return logits


class Top1(BaseMetric):
    default_prefix = ""

    def process(self, data_batch, data_samples):
        for predictions, labels in data_samples:
            self.results.append(((predictions == labels).sum().item(), labels.numel()))

    def compute_metrics(self, results):
        correct = sum(c for c, _ in results)
        total = sum(n for _, n in results)
        return {"top1": 100.0 * correct / max(total, 1)}


class DivergenceHook(Hook):
    """Stops training at the first non-finite loss (the step is recorded)."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        loss = float(outputs["loss"].detach()) if hasattr(outputs["loss"], "detach") else float(outputs["loss"])
        runner.message_hub.update_info("last_loss", loss)
        if not math.isfinite(loss):
            raise Diverged(runner.iter + 1, loss)


def train_classifier(net: nn.Module, recipe, data_root: Path, seed: int = 0, device: str = "cpu",
                     work_dir: Path | None = None) -> dict:
    """Train ``net`` with ``recipe`` (suites.Recipe) and return {"top1", "train_loss", "iters", "val_images"}.
    Raises :class:`Diverged` on a non-finite loss."""
    train_set, val_set = build_datasets(recipe.dataset, data_root, recipe.resolution)
    if recipe.max_iters is not None:  # smoke: a couple of batches are enough to check the plumbing
        train_set = Subset(train_set, range(min(len(train_set), recipe.batch * recipe.max_iters)))
        val_set = Subset(val_set, range(min(len(val_set), recipe.batch * 2)))
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=recipe.batch, shuffle=True, drop_last=True, generator=generator)
    val_loader = DataLoader(val_set, batch_size=max(recipe.batch, 64))
    iters_per_epoch = len(train_loader)
    total = iters_per_epoch * recipe.epochs
    if recipe.max_iters is not None:
        total = min(total, recipe.max_iters)
    warmup = min(int(recipe.warmup_epochs * iters_per_epoch), total - 1)
    schedulers = [dict(type="CosineAnnealingLR", T_max=total - warmup, begin=warmup, end=total, by_epoch=False,
                       eta_min=0.0)]
    if warmup > 0:
        schedulers.insert(0, dict(type="LinearLR", start_factor=1e-3, begin=0, end=warmup, by_epoch=False))
    with tempfile.TemporaryDirectory(prefix="repbench-run-") as tmp:
        runner = Runner(
            model=ImageClassifier(net),
            work_dir=str(work_dir or tmp),
            train_dataloader=train_loader,
            val_dataloader=val_loader,
            val_evaluator=[Top1()],
            train_cfg=dict(by_epoch=False, max_iters=total, val_interval=total + 1),
            val_cfg=dict(),
            optim_wrapper=dict(
                optimizer=dict(type="SGD", lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay),
                paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, bias_lr_mult=2.0)),
            param_scheduler=schedulers,
            default_hooks=dict(checkpoint=None, logger=dict(type="LoggerHook", interval=50)),
            custom_hooks=[DivergenceHook()],
            randomness=dict(seed=seed),
            env_cfg=dict(cudnn_benchmark=False,
                         mp_cfg=dict(mp_start_method=mp.get_start_method(allow_none=True) or "fork")),
            log_level="ERROR",
            default_scope="mmengine",
            experiment_name=f"repbench-{next(tempfile._get_candidate_names())}",
        )
        runner.train()
        metrics = runner.val_loop.run()
        last_loss = runner.message_hub.get_info("last_loss")
    return {"top1": float(metrics["top1"]), "train_loss": last_loss, "iters": total, "val_images": len(val_set)}
