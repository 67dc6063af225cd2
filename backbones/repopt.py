"""RepOptimizers (Ding et al., ICLR 2023; ../shared/papers/repoptimizers-iclr2023.md): structural priors moved into
the optimizer.

* :class:`CSLA` -- the Constant-Scale Linear Addition block of Sec. 3.2 / Fig. 2 / Appendix A and, with trainable
  scales, the Hyper-Search model of Sec. 3.3 / Appendix B::

      y = BN( s * (x conv W3x3) + t * (x conv W1x1) + d * x )

  ``s``, ``t``: channel-wise scales of the 3x3 and 1x1 branches (constants in CSLA, trainable in HS); ``d``: the
  identity branch's trainable channel-wise scale (only where in == out and stride 1), initialised 1.
* :class:`RepOptConvBN` -- the target: one 3x3 conv + BN, which carries the constants of the CSLA block it stands for
  (buffers, so they travel with its checkpoints).
* The two rules (CSLA = GR, Appendix A): :func:`reinitialize` (Rule of Initialization, Eq. 4) and :func:`grad_mult`
  (Rule of Iteration, Eq. 3), used by :class:`RepOptimizerSGD` and :class:`RepOptimizerAdamW`.

The Grad Mult is the sum over the CSLA branches of (branch scale)^power on the kernel positions the branch covers:
the same branch kernels the re-param algebra deploys, with their weights replaced by ones. Power 2 for SGD (momentum,
Nesterov and L2 weight decay are linear in the gradient, so the equivalence is exact), 1 for AdamW (exact only up to
Adam's epsilon and for positive scales; see :class:`RepOptimizerAdamW`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import algebra
from .blocks import TORCH_CONV_INIT_A, ConvBN, ReparamBlock
from .branches import Conv, ConvGeometry, Identity

# Where the paper and the official code differ (official-code notes Sec. 4.2-4.5), both are selectable:
HS_INIT = ("code", "paper", "ones")   # HS scale of the l-th layer of a stage (l = 1 first): code sqrt(2/(l-1)), first 1
#                                       paper sqrt(2/l); ones: all 1 (Table 9's other row)
REINIT_IDENTITY = ("searched", "one")  # Rule of Initialization's identity term: the HS-trained d (code) or 1 (Eq. 4)


def has_identity(geometry: ConvGeometry) -> bool:
    return geometry.in_channels == geometry.out_channels and geometry.stride == 1


def hs_scale_init(layer: int, rule: str = "code") -> float:
    """The initial HS scale of the ``layer``-th 3x3 layer of a stage (1 = the first; 0 = the stem). Paper (Sec. 3.3):
    sqrt(2 / l). Official code: block index i = l - 1 within the stage, 1.0 for i = 0 else sqrt(2 / i). ``ones``:
    1 everywhere (Table 9's "All 1")."""
    if rule not in HS_INIT:
        raise ValueError(f"unknown HS init {rule!r}; expected one of {HS_INIT}")
    if layer <= 0 or rule == "ones":
        return 1.0
    if rule == "paper":
        return math.sqrt(2.0 / layer)
    return 1.0 if layer == 1 else math.sqrt(2.0 / (layer - 1))


class CSLA(ReparamBlock):
    """The CSLA block (``trainable=False``: constant ``s``, ``t``) or the Hyper-Search block (``trainable=True``)."""

    def __init__(self, geometry: ConvGeometry, scale_init: float = 1.0, trainable: bool = False):
        super().__init__()
        g = self.geometry = geometry
        self.trainable = trainable
        self.conv = Conv(g, init_a=TORCH_CONV_INIT_A)
        self.conv_1x1 = Conv(g, 1, 1, init_a=TORCH_CONV_INIT_A)
        scales = torch.full((g.out_channels,), float(scale_init))
        if trainable:
            self.scale_conv, self.scale_1x1 = nn.Parameter(scales.clone()), nn.Parameter(scales.clone())
        else:
            self.register_buffer("scale_conv", scales.clone())
            self.register_buffer("scale_1x1", scales.clone())
        self.identity = Identity(g) if has_identity(g) else None
        self.scale_identity = nn.Parameter(torch.ones(g.out_channels)) if self.identity is not None else None
        self.bn = nn.BatchNorm2d(g.out_channels)

    def branches(self) -> list[tuple[nn.Module, Tensor]]:
        """(branch, its channel-wise scale) pairs."""
        pairs = [(self.conv, self.scale_conv), (self.conv_1x1, self.scale_1x1)]
        return pairs + ([(self.identity, self.scale_identity)] if self.identity is not None else [])

    def forward(self, x):
        return self.bn(sum(branch(x) * scale.reshape(1, -1, 1, 1) for branch, scale in self.branches()))

    def linear_kernel(self) -> Tensor:
        """The one 3x3 kernel equal to the block before its BN (the Rule of Initialization's W)."""
        return sum(branch.scaled_kernel(scale) for branch, scale in self.branches())

    def equivalent_kernel_bias(self):
        return algebra.fuse_conv_bn(self.linear_kernel(), self.bn)


class RepOptConvBN(ConvBN):
    """The RepOpt target: a 3x3 conv + BN whose gradients a RepOptimizer multiplies by the Grad Mult of the CSLA block
    it stands for. ``scale_conv`` / ``scale_1x1`` hold that block's constants (1 and 0 until :func:`reinitialize`
    sets them: Grad Mult 1, plain training); the identity term is structural (in == out, stride 1)."""

    def __init__(self, geometry: ConvGeometry):
        super().__init__(geometry)
        self.register_buffer("scale_conv", torch.ones(geometry.out_channels))
        self.register_buffer("scale_1x1", torch.zeros(geometry.out_channels))
        self.register_buffer("identity_in_mult", torch.zeros(()))  # 1 once the block stands for a CSLA block


@dataclass
class BlockScales:
    """One CSLA block's scales: ``conv`` (s), ``one`` (t) and ``identity`` (d, None where the block has none)."""

    conv: Tensor
    one: Tensor
    identity: Tensor | None = None


def grad_mult(geometry: ConvGeometry, conv: Tensor, one: Tensor, identity: bool, power: int) -> Tensor:
    """Eq. 3 for any power: ``conv**p`` on every position, ``+ one**p`` on the centre, ``+ 1`` on the centre of the
    diagonal where the block has an identity (its trainable scale is a depthwise 1x1 conv behind a constant 1)."""
    g = geometry
    shape = (g.out_channels, g.in_channels // g.groups, g.kernel_size, g.kernel_size)
    ones = torch.ones(shape, dtype=conv.dtype, device=conv.device)
    mult = ones * conv.pow(power).reshape(-1, 1, 1, 1)
    centre = algebra.pad_kernel(ones[..., :1, :1], g.kernel_size)
    mult = mult + centre * one.pow(power).reshape(-1, 1, 1, 1)
    if identity:
        mult = mult + algebra.identity_kernel(g.out_channels, g.kernel_size, g.groups, conv.dtype, conv.device)
    return mult


def target_blocks(model: nn.Module) -> list[RepOptConvBN]:
    return [m for m in model.modules() if isinstance(m, RepOptConvBN)]


def csla_blocks(model: nn.Module) -> list[CSLA]:
    return [m for m in model.modules() if isinstance(m, CSLA)]


def scales_of(model: nn.Module) -> list[BlockScales]:
    """The scales of a CSLA / HS model's blocks, in network order (what Hyper-Search hands to the target)."""
    return [BlockScales(b.scale_conv.detach().clone(), b.scale_1x1.detach().clone(),
                        None if b.scale_identity is None else b.scale_identity.detach().clone())
            for b in csla_blocks(model)]


ABLATIONS = ("ones", "channel_mean")


def ablated_scales(scales: list[BlockScales], how: str) -> list[BlockScales]:
    """Table 4's other sources of constants: ``ones`` (every scale 1) or ``channel_mean`` (each layer's scales
    averaged over its channels). The third, "same as HS initialization", is ``scales_of`` a freshly built HS model."""
    if how not in ABLATIONS:
        raise ValueError(f"unknown ablation {how!r}; expected one of {ABLATIONS}")
    change = torch.ones_like if how == "ones" else (lambda t: torch.full_like(t, float(t.mean())))
    return [BlockScales(change(s.conv), change(s.one), None if s.identity is None else change(s.identity))
            for s in scales]


@torch.no_grad()
def reinitialize(model: nn.Module, scales: list[BlockScales], identity: str = "searched",
                 generator: torch.Generator | None = None) -> None:
    """The Rule of Initialization (Eq. 4) on every target block, and its constants recorded for the Grad Mults.

    Each 3x3 kernel W (as built) becomes ``s * W + t * pad(K1) [+ d * I]`` with K1 a fresh 1x1 kernel initialised
    as ``nn.Conv2d`` does (official code) and ``d`` the searched identity scale (``identity="searched"``, official
    code) or 1 (``"one"``, Eq. 4). BN weights must still be 1 (a model trained from scratch)."""
    if identity not in REINIT_IDENTITY:
        raise ValueError(f"unknown identity rule {identity!r}; expected one of {REINIT_IDENTITY}")
    blocks = target_blocks(model)
    if len(blocks) != len(scales):
        raise ValueError(f"{len(scales)} blocks of scales for a model with {len(blocks)} RepOpt blocks")
    for i, (block, s) in enumerate(zip(blocks, scales)):
        g = block.geometry
        if s.conv.shape != (g.out_channels,) or s.one.shape != (g.out_channels,):
            raise ValueError(f"block {i}: scales of {tuple(s.conv.shape)} channels for a conv with "
                             f"{g.out_channels} output channels")
        if has_identity(g) != (s.identity is not None):
            raise ValueError(f"block {i}: the scales {'lack' if s.identity is None else 'have'} an identity term "
                             f"the block {'has' if has_identity(g) else 'does not have'}")
        if not torch.all(block.bn.weight == 1):
            raise ValueError(f"block {i}: BN weights are not 1; the Rule of Initialization needs an untrained model")
        weight = block.conv.weight
        k1 = torch.empty(g.out_channels, g.in_channels // g.groups, 1, 1, dtype=weight.dtype)
        nn.init.kaiming_uniform_(k1, a=TORCH_CONV_INIT_A, generator=generator)
        kernel = weight * s.conv.to(weight).reshape(-1, 1, 1, 1)
        kernel += algebra.pad_kernel(k1.to(weight.device), g.kernel_size) * s.one.to(weight).reshape(-1, 1, 1, 1)
        if s.identity is not None:
            d = s.identity.to(weight) if identity == "searched" else torch.ones_like(s.identity).to(weight)
            kernel += algebra.identity_kernel(g.out_channels, g.kernel_size, g.groups, weight.dtype,
                                              weight.device) * d.reshape(-1, 1, 1, 1)
        weight.copy_(kernel)
        set_constants(block, s)


@torch.no_grad()
def set_constants(block: RepOptConvBN, scales: BlockScales) -> None:
    """Record a block's CSLA constants (what its Grad Mult is built from) without touching its weights (the "no
    re-initialisation" ablation of Table 4 uses this alone)."""
    block.scale_conv.copy_(scales.conv)
    block.scale_1x1.copy_(scales.one)
    block.identity_in_mult.fill_(float(scales.identity is not None))


def grad_mults(model: nn.Module, power: int) -> dict[Tensor, Tensor]:
    """conv weight -> its Grad Mult, for every target block of ``model``."""
    return {b.conv.weight: grad_mult(b.geometry, b.scale_conv, b.scale_1x1, bool(b.identity_in_mult), power)
            for b in target_blocks(model)}


# -- scales files --------------------------------------------------------------------------------------------------

def save_scales(scales: list[BlockScales], path: str | Path) -> Path:
    """A scales file: a plain state dict ``block{i}.scale_conv`` / ``.scale_1x1`` / ``.scale_identity``."""
    state = {}
    for i, s in enumerate(scales):
        state[f"block{i}.scale_conv"], state[f"block{i}.scale_1x1"] = s.conv.float(), s.one.float()
        if s.identity is not None:
            state[f"block{i}.scale_identity"] = s.identity.float()
    path = Path(path)
    torch.save(state, path)
    return path


def load_scales(path: str | Path) -> list[BlockScales]:
    """Scales from this suite's file or from the official layout (an HS state dict, possibly inside 'model' or
    'state_dict': ``stage0.scale_conv.weight``, ``stage{i}.{j}.scale_1x1.weight``, ``...scale_identity.weight``;
    official-code notes Sec. 4.3). Loaded with ``weights_only=True``: tensors only, no code."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises pickle, zip and runtime errors alike for a bad file
        raise ValueError(f"{path}: not a readable scales file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: not a scales file (expected a state dict of scale tensors)")
    prefixes: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        for name in ("scale_conv", "scale_1x1", "scale_identity"):
            if key.endswith(f".{name}.weight") or key.endswith(f".{name}"):
                prefix = key[: key.rindex(f".{name}")]
                prefixes.setdefault(prefix, {})[name] = value.reshape(-1)
    if not prefixes:
        raise ValueError(f"{path}: no scale_conv / scale_1x1 tensors in it")

    def order(prefix: str):  # block{i} or stage{i}[.{j}], numerically
        return [int(part) if part.isdigit() else part for part in
                prefix.replace("block", "block.").replace("stage", "stage.").split(".")]

    out = []
    for prefix in sorted(prefixes, key=order):
        found = prefixes[prefix]
        if "scale_conv" not in found or "scale_1x1" not in found:
            raise ValueError(f"{path}: block {prefix} lacks scale_conv or scale_1x1")
        out.append(BlockScales(found["scale_conv"], found["scale_1x1"], found.get("scale_identity")))
    return out


# -- the optimizers ------------------------------------------------------------------------------------------------

def checked_mults(grad_mults: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
    for p, m in grad_mults.items():
        if m.shape != p.shape:
            raise ValueError(f"a Grad Mult of shape {tuple(m.shape)} for a parameter of shape {tuple(p.shape)}")
    return grad_mults


def _mult_of(grad_mults: dict[Tensor, Tensor], p: Tensor) -> Tensor | None:
    """``p``'s Grad Mult on ``p``'s device and dtype (moved once, on first use), or None."""
    mult = grad_mults.get(p)
    if mult is not None and (mult.device != p.device or mult.dtype != p.dtype):
        mult = grad_mults[p] = mult.to(p)
    return mult


def _evaluate(closure) -> Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class RepOptimizerSGD(torch.optim.SGD):
    """SGD (momentum, Nesterov, L2 weight decay as torch's SGD) whose gradients are multiplied by the Grad Mults
    (power 2) before the update; the weight decay term is not multiplied (it is linear in the equivalent kernel)."""

    power = 2

    def __init__(self, params, grad_mults: dict[Tensor, Tensor] | None = None, lr: float = 0.1, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.grad_mults = checked_mults(grad_mults or {})  # {}: set later (backbones.mm.RepOptimizerConstructor)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for p in list(self.grad_mults):
            if p.grad is not None:
                p.grad.mul_(_mult_of(self.grad_mults, p))
        super().step()
        return loss


class RepOptimizerAdamW(torch.optim.AdamW):
    """AdamW with Grad Mults of power 1 (the official code's rule): the gradient is multiplied by M before the
    moments and the update by M again, so that for a parameter made of branches with positive scales c_b (M = sum
    c_b) the update is ``lr * M * m / (sqrt(v) + eps / M)`` where a CSLA block trained with AdamW moves by
    ``lr * sum_b c_b * m / (sqrt(v) + eps / c_b)``: equal up to Adam's epsilon. Per element and step the two differ by
    at most ``lr * eps * (n_b - 1) * |m| / v`` (n_b: branches covering the element; bias-corrected moments), see
    tests/test_repopt.py. With a negative scale the CSLA update takes |c_b|, not c_b: no equivalence."""

    power = 1

    def __init__(self, params, grad_mults: dict[Tensor, Tensor] | None = None, lr: float = 1e-3, **kwargs):
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise ValueError("RepOptimizerAdamW supports neither amsgrad nor maximize")
        super().__init__(params, lr=lr, foreach=False, **kwargs)
        self.grad_mults = checked_mults(grad_mults or {})  # {}: set later (backbones.mm.RepOptimizerConstructor)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mult = _mult_of(self.grad_mults, p)
                grad = p.grad if mult is None else p.grad * mult
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                update = state["exp_avg"] / (1 - beta1 ** step) / denom
                if mult is not None:
                    update = update * mult
                p.add_(update, alpha=-group["lr"])
        return loss


REPOPTIMIZERS = {"sgd": RepOptimizerSGD, "adamw": RepOptimizerAdamW}


def build_repoptimizer(kind: str, model: nn.Module, params=None, **kwargs) -> torch.optim.Optimizer:
    """A RepOptimizer over ``params`` (default: the model's parameters) with the Grad Mults of ``model``'s target
    blocks at the optimizer's power. Gradient clipping breaks CSLA = GR: refused."""
    if kind not in REPOPTIMIZERS:
        raise ValueError(f"unknown RepOptimizer {kind!r}; expected one of {sorted(REPOPTIMIZERS)}")
    if kwargs.pop("clip_grad", None):
        raise ValueError("gradient clipping breaks the RepOptimizer's equivalence with CSLA (RepOptimizers README: "
                         "clip only in Hyper-Search); remove clip_grad")
    cls = REPOPTIMIZERS[kind]
    return cls(model.parameters() if params is None else params, grad_mults(model, cls.power), **kwargs)
