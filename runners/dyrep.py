"""DyRep's controller (Huang et al., CVPR 2022, Algorithm 1): saliency of every growable conv from the gradients the
optimizer step uses, every t epochs the top conv grown and weak branches cut (backbones/dyrep.py does the block
surgery), the optimizer fixed up after each change, and the changes kept as events that rebuild the structure.

* :class:`Saliency` scores each site before every optimizer step (``torch.optim.Optimizer.register_step_pre_hook``:
  after backward, after gradient accumulation and DDP's all-reduce, before the update; MMEngine has no hook point
  there). ``synflow`` (default, Eq. 3-4: the signed sum of grad * weight, as the official code), ``snip`` (sum of
  |grad * weight|), ``grad_norm`` (L2 norm of the gradient), ``random``, ``grasp`` (a Hessian-vector product: an
  extra forward and double backward per step) and ``vote`` (Appendix A.3; see :class:`Saliency`).
* :func:`dep_candidates`: the branches a grown block loses, by the paper's rule (Eq. 9: s_j = mean |gamma| of the
  branch's last BN; when the population std of the new branches' s_j exceeds lambda = 0.02, cut those below their
  mean) or the official code's (the same with s_j relative to the kxk branch's and a cut only below 0.1 too).
* :func:`refit_optimizer`: new parameters join the param group of the parameter they replace or resemble (a new
  conv kernel: the grown conv's group; a new BN weight / bias: a BN weight's / bias's group), with empty state;
  parameters that left the model leave their groups and their state is dropped. Param groups keep their number, so
  lr schedulers (which hold one base value per group) keep working.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from mmengine.hooks import Hook
from mmengine.model import MMDistributedDataParallel, is_model_wrapper
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import Registry
from torch import Tensor, nn

from backbones.blocks import ConvBN, MultiBranchConv
from backbones.dyrep import GAMMA, OP_SPACES, OPS, Grown, branch_importance, collapse, cut, grow, sites

METRICS = ("synflow", "snip", "grad_norm", "random", "grasp", "vote")
VOTERS = ("synflow", "snip", "grasp")  # vote: one vote each for its top site (see Saliency)
DEP_RULES = ("paper", "code")


def site_weight(parent: nn.Module, attr: str) -> Tensor:
    """The kernel parameter of a growable site (a ConvBN's nn.Conv2d, or a grown block's Conv origin branch)."""
    site = parent[attr] if isinstance(parent, nn.ModuleDict) else getattr(parent, attr)
    return site.weight


class _FrozenBatchNormStatistics:
    """BN running statistics unchanged by the forwards inside (GraSP's extra forward on the step's batch)."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(bn.momentum, {k: v.clone() for k, v in bn.named_buffers(recurse=False)}) for bn in self.bns]
        for bn in self.bns:
            bn.momentum = 0.0

    def __exit__(self, *exc):
        with torch.no_grad():
            for bn, (momentum, buffers) in zip(self.bns, self.saved):
                bn.momentum = momentum
                for k, v in buffers.items():
                    getattr(bn, k).copy_(v)


class Saliency:
    """Per-site saliency averaged over the optimizer steps since the last :meth:`reset`.

    ``grasp`` (Eq. 14: -sum(H g * w), g the step's gradient) needs ``loss_fn()``: the loss of the step's batch, with
    its graph, recomputed on the model (BN statistics untouched). Its Hessian-vector product is exact (double
    backward): one extra forward and two extra backwards per optimizer step, about twice a training step's cost, and
    it is local to the process (DDP all-reduces the step's gradient g, not H g); under gradient accumulation it uses
    the last micro-batch. ``vote`` (Appendix A.3, after Abdelfattah et al. [1]; the paper names neither voters nor
    ties, so this is a recorded choice): synflow, snip and grasp each vote for their top site, the site with the most
    votes grows, ties broken by synflow."""

    def __init__(self, model: nn.Module, metric: str = "synflow", generator: torch.Generator | None = None,
                 loss_fn=None):
        if metric not in METRICS:
            raise ValueError(f"unknown saliency metric {metric!r}; expected one of {METRICS}")
        self.model, self.metric, self.generator = model, metric, generator or torch.Generator().manual_seed(0)
        self.loss_fn = loss_fn
        self.measured = VOTERS if metric == "vote" else (metric,)
        self.sums: dict[str, dict[str, float]] = {m: {} for m in self.measured}
        self.counts: dict[str, int] = {}
        self._handle = None

    def attach(self, optimizer: torch.optim.Optimizer) -> Saliency:
        self.detach()
        self._handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.record())
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def record(self) -> None:
        """One optimizer step's scores (the gradients as the step will use them)."""
        scored = {name: site_weight(parent, attr) for name, (parent, attr) in sites(self.model).items()}
        scored = {name: w for name, w in scored.items() if w.grad is not None}
        if not scored:
            return
        hg = self._hessian_gradient(list(scored.values())) if "grasp" in self.measured else None
        with torch.no_grad():
            for i, (name, weight) in enumerate(scored.items()):
                grad = weight.grad
                for metric in self.measured:
                    if metric == "synflow":
                        score = float((grad * weight).sum())
                    elif metric == "snip":
                        score = float((grad * weight).abs().sum())
                    elif metric == "grad_norm":
                        score = float(grad.norm())
                    elif metric == "grasp":
                        score = -float((hg[i] * weight).sum())
                    else:
                        score = float(torch.rand((), generator=self.generator))
                    self.sums[metric][name] = self.sums[metric].get(name, 0.0) + score
                self.counts[name] = self.counts.get(name, 0) + 1

    def _hessian_gradient(self, weights: list[Tensor]) -> list[Tensor]:
        """H g for each of ``weights``: the gradient of (grad L . g) with g the step's gradient held constant."""
        if self.loss_fn is None:
            raise ValueError("the grasp saliency needs loss_fn (the step's loss, recomputed with its graph)")
        params = [p for p in self.model.parameters() if p.grad is not None]
        held = [p.grad.detach().clone() for p in params]
        with _FrozenBatchNormStatistics(self.model), torch.enable_grad():
            grads = torch.autograd.grad(self.loss_fn(), params, create_graph=True, allow_unused=True)
            dot = sum((g * v).sum() for g, v in zip(grads, held) if g is not None)
            hg = torch.autograd.grad(dot, weights, allow_unused=True)
        return [torch.zeros_like(w) if h is None else h.detach() for w, h in zip(weights, hg)]

    def averages(self) -> dict[str, float]:
        """Each site's score: its metric averaged over the steps (vote: the number of votes it got)."""
        means = {m: {n: s / self.counts[n] for n, s in sums.items()} for m, sums in self.sums.items()}
        if self.metric != "vote":
            return means[self.metric]
        votes = dict.fromkeys(self.counts, 0.0)
        for m in VOTERS:
            if means[m]:
                votes[max(means[m], key=means[m].get)] += 1
        return votes

    def ranked(self, candidates) -> list[str]:
        """The sites among ``candidates`` best first."""
        scores = self.averages()
        tie = {n: s / self.counts[n] for n, s in self.sums["synflow"].items()} if self.metric == "vote" else scores
        return sorted((s for s in scores if s in candidates), key=lambda s: (scores[s], tie[s]), reverse=True)

    def reset(self) -> None:
        for sums in self.sums.values():
            sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict:
        return {"sums": {m: dict(sums) for m, sums in self.sums.items()}, "counts": dict(self.counts),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {m: dict(sums) for m, sums in state["sums"].items()}
        self.counts = dict(state["counts"])
        self.generator.set_state(state["generator"])


def dep_candidates(block: MultiBranchConv, rule: str = "code", gate: float = 0.02, floor: float = 0.1) -> list[str]:
    """The branches ``block`` loses now (never the kxk origin); see the module docstring for the two rules."""
    if rule not in DEP_RULES:
        raise ValueError(f"unknown Dep rule {rule!r}; expected one of {DEP_RULES}")
    if rule == "code":
        weights = {n: w for n, w in branch_importance(block).items() if n != "origin"}
    else:
        weights = {n: float(block.norms[n].weight.abs().mean()) for n in block.branches if n != "origin"}
    if len(weights) < 2:
        return []
    values = list(weights.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std <= gate:
        return []
    return [n for n, w in weights.items() if w < mean and (rule == "paper" or w < floor)]


def refit_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, twins: dict[Tensor, Tensor]) -> None:
    """After a structure change: every parameter of ``model`` not in the optimizer joins the group of its twin
    (``twins``: new parameter -> an old one of the same role, possibly gone from the model now) with empty state;
    parameters the optimizer holds that left the model are removed with their state."""
    live = {id(p) for p in model.parameters()}
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    twin_of = {id(new): old for new, old in twins.items()}  # by identity: tensors compare element-wise
    for p in model.parameters():
        if id(p) in group_of:
            continue
        twin = twin_of.get(id(p))
        while twin is not None and id(twin) not in group_of and id(twin) in twin_of:  # a twin that is new too
            twin = twin_of[id(twin)]
        if twin is None or id(twin) not in group_of:
            raise ValueError(f"a new parameter of shape {tuple(p.shape)} has no twin in the optimizer")
        group_of[id(twin)]["params"].append(p)
        group_of[id(p)] = group_of[id(twin)]
    for group in optimizer.param_groups:
        for p in [p for p in group["params"] if id(p) not in live]:
            optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in live]


def twins_after(model: nn.Module, grown: MultiBranchConv, replaced: Tensor) -> dict[Tensor, Tensor]:
    """The twin of each parameter of a freshly grown block: conv kernels (4-D) the replaced kernel, BN weights and
    biases a BN weight / bias the optimizer already holds (the model's first BN outside the block)."""
    outside = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                   and all(m is not n for n in grown.modules()))
    twins = {}
    for module in grown.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 4:
                twins[p] = replaced
            elif isinstance(module, nn.BatchNorm2d):
                twins[p] = getattr(outside, name)
            else:
                raise ValueError(f"no twin rule for {type(module).__name__}.{name}")
    return twins


@dataclass
class Event:
    """One change of the structure: ``grow`` (a site, the ops it took) or ``cut`` (a grown block's branches)."""

    epoch: int
    kind: str              # grow | cut | collapse
    site: str              # grow: the site grown; cut / collapse: the grown block (its module name)
    branches: list[str] = field(default_factory=list)
    score: float | None = None


class DyRep:
    """Algorithm 1 on a model and its optimizer: :meth:`adjust` every ``interval`` epochs (up to ``max_epoch``)
    grows the top-scoring site and cuts by ``rule``; :meth:`state_dict` / :meth:`load_state_dict` carry the events
    (which rebuild the structure on a fresh model, before its weights are loaded) and the accumulated scores."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, metric: str = "synflow",
                 interval: int = 1, max_epoch: int | None = None, rule: str = "code", gamma: float = GAMMA,
                 ops: tuple[str, ...] = OPS, seed: int = 0, dep: bool = True, loss_fn=None):
        if rule not in DEP_RULES:
            raise ValueError(f"unknown Dep rule {rule!r}; expected one of {DEP_RULES}")
        self.model, self.optimizer = model, optimizer
        self.interval, self.max_epoch, self.rule, self.gamma, self.ops = interval, max_epoch, rule, gamma, ops
        self.dep = dep  # DyRep Table 6: without Dep nothing is ever cut
        self.generator = torch.Generator().manual_seed(seed)
        self.saliency = Saliency(model, metric, loss_fn=loss_fn)
        if optimizer is not None:
            self.saliency.attach(optimizer)
        self.events: list[Event] = []

    def due(self, epoch: int) -> bool:
        """After epoch ``epoch`` (0-based) ends: is it an adjustment epoch?"""
        return (epoch + 1) % self.interval == 0 and (self.max_epoch is None or epoch < self.max_epoch)

    def adjust(self, epoch: int, recalibrate=None) -> list[Event]:
        """Rep (the top-scoring site grows; ``recalibrate(block)`` sets its new BNs' statistics first) and Dep (every
        grown block cut by the rule; a block left with its origin alone collapses to a conv)."""
        events = []
        scores = self.saliency.averages()
        ranked = self.saliency.ranked(sites(self.model))
        twins = {}
        if ranked:
            name = ranked[0]
            block, new = self._grow(name, self.ops, recalibrate)
            twins.update(new)
            events.append(Event(epoch, "grow", name, list(block.branches), scores[name]))
        self.saliency.reset()
        for name, module in list(self.model.named_modules()) if self.dep else ():
            if isinstance(module, MultiBranchConv) and self._grown(module):
                gone = dep_candidates(module, self.rule)
                if gone:
                    cut(module, gone)
                    events.append(Event(epoch, "cut", name, gone))
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ConvBN) and isinstance(module.conv, MultiBranchConv) and \
                    list(module.conv.branches) == ["origin"]:
                twins.update(self._collapse(module))
                events.append(Event(epoch, "collapse", f"{name}.conv"))
        if self.optimizer is not None and events:
            refit_optimizer(self.optimizer, self.model, twins)
        self.events += events
        return events

    def _grow(self, site: str, ops: tuple[str, ...], recalibrate=None) -> tuple[MultiBranchConv, dict]:
        """Grow ``site``; the new block and its parameters' twins (refit_optimizer)."""
        parent, attr = sites(self.model)[site]
        replaced = site_weight(parent, attr)
        block = grow(parent, attr, ops, self.gamma, self.generator, recalibrate)
        return block, twins_after(self.model, block, replaced)

    @staticmethod
    def _collapse(host: ConvBN) -> dict:
        """Collapse ``host``'s lone-origin block; the new conv's kernel and bias take the old kernel's and a BN
        bias's groups."""
        kernel = next(p for p in host.conv.parameters() if p.dim() == 4)
        collapse(host)
        return {host.conv.weight: kernel, host.conv.bias: host.bn.bias}

    def _grown(self, block: MultiBranchConv) -> bool:
        return any(block is m.conv for m in self.model.modules() if isinstance(m, ConvBN)) or \
            any(block is m.block for m in self.model.modules() if isinstance(m, Grown))

    def state_dict(self) -> dict:
        return {"events": [asdict(e) for e in self.events], "saliency": self.saliency.state_dict(),
                "generator": self.generator.get_state()}

    def replay(self, events: list[Event]) -> dict:
        """Apply ``events`` to this model; the new parameters' twins (refit_optimizer)."""
        twins = {}
        for event in events:
            if event.kind == "grow":
                twins.update(self._grow(event.site, tuple(event.branches))[1])
            elif event.kind == "cut":
                cut(self.model.get_submodule(event.site), event.branches)
            else:
                twins.update(self._collapse(self.model.get_submodule(event.site.rsplit(".", 1)[0])))
            self.events.append(event)
        return twins

    def load_state_dict(self, state: dict) -> None:
        """Replay the events on this (fresh) model, the optimizer refitted: the structure the checkpoint's weights
        and optimizer state belong to (load those after this)."""
        twins = self.replay([Event(**data) for data in state["events"]])
        if self.optimizer is not None:
            refit_optimizer(self.optimizer, self.model, twins)
        self.saliency.load_state_dict(state["saliency"])
        self.generator.set_state(state["generator"])


@torch.no_grad()
def recalibrate_bn(block: nn.Module, model: nn.Module, batches, forward) -> None:
    """The official code's BN recalibration of a grown block: its BNs' statistics reset and re-estimated as a
    cumulative average over ``batches`` (forwarded through the whole ``model`` in eval mode by ``forward(batch)``,
    only the block's BNs in train mode), averaged over the ranks of a process group; every mode restored
    afterwards."""
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in batches:
            forward(batch)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank's batches count
            world = torch.distributed.get_world_size()
            for bn in bns:
                for stat in (bn.running_mean, bn.running_var):
                    torch.distributed.all_reduce(stat)
                    stat /= world
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        for m, mode in modes.items():
            m.training = mode


HOOKS = Registry("hook", parent=MMENGINE_HOOKS, scope="repbench", locations=["runners.dyrep"])


@HOOKS.register_module()
class DyRepHook(Hook):
    """DyRep in any MMEngine training (``custom_hooks=[dict(type="repbench.DyRepHook", interval=5, max_epoch=100)]``
    with ``custom_imports=dict(imports=["runners.dyrep"])``): scores every optimizer step; after every
    ``interval``-th epoch (below ``max_epoch``) grows the top conv (its new BNs recalibrated on ``recal_batches``
    training batches, 20 as the official code), cuts by ``rule``, fixes the optimizer and re-wraps a DDP model
    (find_unused_parameters, as the official code)."""

    priority = "NORMAL"

    def __init__(self, interval: int = 1, max_epoch: int | None = None, metric: str = "synflow",
                 rule: str = "code", gamma: float = GAMMA, recal_batches: int = 20, seed: int = 0, dep: bool = True,
                 on_events=None, module: str = "", ops: str = "dyrep", every: float | None = None,
                 until: float = 1.0):
        if ops not in OP_SPACES:
            raise ValueError(f"unknown op space {ops!r}; expected one of {sorted(OP_SPACES)}")
        if every is not None and not (0 < every <= 1 and 0 < until <= 1):
            raise ValueError(f"every={every}, until={until}: fractions of the run's steps in (0, 1]")
        # ``every`` / ``until``: adjust by optimizer step instead of by epoch, after every ``every`` of the run's steps
        # (runner.max_iters) before ``until`` of them (a downstream finetuning, epoch- or iteration-based alike;
        # the events' "epoch" is then the step index); ``interval`` / ``max_epoch`` are then derived from them
        self.every, self.until = every, until
        self.settings = dict(metric=metric, interval=interval, max_epoch=max_epoch, rule=rule, gamma=gamma,
                             seed=seed, dep=dep, ops=OP_SPACES[ops])
        self.recal_batches = recal_batches
        self.on_events = on_events  # called with each adjustment's events (the suite stores them with the run)
        self.module = module  # the submodule of the runner's model that grows ("" the whole model; "net" the suite's
        #                       classifier's network, "backbone" a detector's), so that sites are named within it
        self.dyrep: DyRep | None = None
        self._batch = None  # the iteration's data batch: grasp recomputes its loss

    # the suite's training state (runners/train.py TrainState) carries this with its checkpoints
    def checkpoint_state(self) -> dict:
        return self.dyrep.state_dict()

    def restore(self, state: dict, runner) -> None:
        """Before the checkpoint's weights load: replay the structure (and refit the optimizer) it belongs to."""
        self.dyrep.load_state_dict(state)
        self._rewrap(runner)

    def _rewrap(self, runner) -> None:
        if isinstance(runner.model, MMDistributedDataParallel):
            runner.model = MMDistributedDataParallel(module=runner.model.module, device_ids=runner.model.device_ids,
                                                     find_unused_parameters=True)

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if self.every is not None:
            steps = runner.max_iters
            self.settings.update(interval=max(1, round(self.every * steps)), max_epoch=int(self.until * steps))

        def loss_fn():  # the step's loss on the unwrapped model (no DDP gradient hooks), as train_step computes it
            losses = model._run_forward(model.data_preprocessor(self._batch, True), mode="loss")
            return model.parse_losses(losses)[0]

        self.dyrep = DyRep(model.get_submodule(self.module), runner.optim_wrapper.optimizer, loss_fn=loss_fn,
                           **self.settings)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._batch = data_batch

    def after_train_epoch(self, runner):
        # runner.epoch is still the epoch just trained here (MMEngine advances it after this hook)
        if self.every is None:
            self._adjust(runner, runner.epoch)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every is not None:  # runner.iter is still the step just taken here
            self._adjust(runner, runner.iter)

    def _adjust(self, runner, index: int) -> None:
        if not self.dyrep.due(index):
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model

        def forward(batch):  # an MMEngine BaseModel: its preprocessor, then forward as train_step calls it
            model._run_forward(model.data_preprocessor(batch, False), mode="tensor")

        loader = runner.train_dataloader
        if self.every is not None:
            # by step, the loop draws from one iterator over an infinite sampler, which a second iteration of the
            # same loader would close: the recalibration batches come from a loader of their own over the dataset
            loader = torch.utils.data.DataLoader(
                loader.dataset, batch_size=loader.batch_size, shuffle=True, collate_fn=loader.collate_fn,
                generator=torch.Generator().manual_seed(self.settings["seed"] + index))

        def recalibrate(block):
            batches = (b for _, b in zip(range(self.recal_batches), loader))
            recalibrate_bn(block, model, batches, forward)

        events = self.dyrep.adjust(index, recalibrate)
        for event in events:
            runner.logger.info(f"DyRep {'step' if self.every is not None else 'epoch'} {event.epoch + 1}: "
                               f"{event.kind} {event.site} {' '.join(event.branches)}")
        if events and self.on_events is not None:
            self.on_events(events)
        self._rewrap(runner)


def replay(model: nn.Module, events: list[Event]) -> None:
    """The structure ``events`` describe, on ``model`` (the plain network they started from)."""
    DyRep(model).replay(events)


def average_costs(build, events: list[Event], epochs: int, resolution: int) -> tuple[float, float]:
    """Parameters and MACs of the training-form network averaged over ``epochs`` training epochs (DyRep's "Avg.
    params / FLOPs"): epoch e trains the structure left by the events of epochs before e (a fixed structure's events
    carry epoch -1). ``build()``: the network as it started."""
    from runners.probes import _on_meta, count_macs, count_params
    model = build()
    grower = DyRep(model)
    totals = [0.0, 0.0]
    pending = sorted(events, key=lambda e: e.epoch)
    for epoch in range(epochs):
        applied = [e for e in pending if e.epoch < epoch]
        if applied or epoch == 0:
            pending = pending[len(applied):]
            grower.replay(applied)
            params, macs = count_params(model), count_macs(_on_meta(model.eval()), resolution)
        totals[0] += params
        totals[1] += macs
    return totals[0] / epochs, totals[1] / epochs
