"""DyRep (Huang et al., CVPR 2022; ../shared/papers/dyrep-cvpr2022.md): a kxk conv grows into a multi-branch block
during training (Rep, Sec. 4.1) and the block loses its weak branches again (Dep, Sec. 4.2), the block's eval-mode
function unchanged by either.

A grown conv is a :class:`~backbones.blocks.MultiBranchConv` in the ``offline_bn`` form (every branch ends in its
own BN, outputs added; no post-addition BN: the host's BN after the conv stays, as in the official code) over
DyRep's op space (Table 1): kxk (``origin``), 1x1, 1x1-kxk, 1x1-avg (``avg``), 1xk (``hor``), kx1 (``ver``) and
identity. The host is a :class:`~backbones.blocks.ConvBN` (every conv+BN of this suite's plain networks): its
``conv`` is replaced by the grown block, and ``deploy`` folds the whole thing back into one conv.

The algebra is the suite's (backbones/algebra.py, each branch's ``kernel_bias``): growing sets the ``origin``
branch to ``W - sum of the new branches' equivalent kernels`` (Eq. 6) and cutting sets it to ``W_all - sum of the
kept ones`` (Eq. 10), where ``W`` is the block's equivalent kernel before the change. The origin branch's BN then
holds gamma 1, beta = the bias difference, running mean 0 and variance 1 (its kernel is scaled by sqrt(1 + eps) so
that the BN's division gives back the exact kernel). Growth is recursive through the origin branch: a grown block's
``origin`` can itself grow (:class:`Grown`), and the assignment of the origin recurses into it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import algebra
from .blocks import ConvBN, MultiBranchConv, RepVGGBlock, ReparamBlock
from .branches import Branch, Conv, ConvGeometry

OPS = ("origin", "1x1", "1x1_kxk", "avg", "hor", "ver", "identity")  # DyRep Table 1, in the paper's order
OP_SPACES = {"dyrep": OPS, "dbb": ("origin", "1x1", "1x1_kxk", "avg")}  # DyRep Table 8: its 7 ops or DBB's 4
GAMMA = 0.01  # the new branches' last-BN scale (Sec. 4.1: "We set gamma = 0.01")


def allowed_ops(geometry: ConvGeometry, ops: tuple[str, ...] = OPS) -> tuple[str, ...]:
    """The ops a conv of ``geometry`` can grow: identity only where in == out and stride 1; no 1x1, 1xk, kx1 or
    identity where the padding is not the "same" padding (as the official code's unequal-padding mask)."""
    g = geometry
    same = g.padding == g.kernel_size // 2 * g.dilation
    out = []
    for op in ops:
        if op == "identity" and (g.in_channels != g.out_channels or g.stride != 1):
            continue
        if op in ("1x1", "hor", "ver", "identity") and not same:
            continue
        out.append(op)
    if "origin" not in out:
        raise ValueError("a grown block keeps its kxk branch ('origin')")
    return tuple(out)


class Grown(Branch):
    """A branch that grew: the origin branch of a grown block replaced by a grown block of its own (nested Rep)."""

    def __init__(self, block: MultiBranchConv):
        super().__init__(block.geometry)
        self.block = block

    def forward(self, x):
        return self.block(x)

    def kernel_bias(self):
        return self.block.equivalent_kernel_bias()


def kernel_bias_of(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of a conv site: an nn.Conv2d, a Conv branch, a grown block or a Grown branch."""
    if isinstance(module, nn.Conv2d):
        bias = module.bias if module.bias is not None else module.weight.new_zeros(module.out_channels)
        return module.weight, bias
    if isinstance(module, ReparamBlock):
        return module.equivalent_kernel_bias()
    kernel, bias = module.kernel_bias()
    return kernel, bias if bias is not None else kernel.new_zeros(kernel.shape[0])


@torch.no_grad()
def init_branch(branch: nn.Module, norm: nn.BatchNorm2d, gamma: float, generator: torch.Generator | None) -> None:
    """A new branch as the official code starts it: every conv weight normal(0, sqrt(2 / (kh * kw * out))) (fan-out),
    every BN reset (gamma 1, beta 0, fresh statistics), the branch's last BN gamma = ``gamma``."""
    for p in branch.parameters(recurse=True):
        if p.dim() == 4:
            fan_out = p.shape[0] * p.shape[2] * p.shape[3]
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * math.sqrt(2.0 / fan_out))
    for bn in [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)] + [norm]:
        bn.reset_parameters()
    norm.weight.fill_(gamma)


@torch.no_grad()
def assign_origin(block: MultiBranchConv, kernel: Tensor, bias: Tensor) -> None:
    """Make ``block``'s eval-mode function the conv (``kernel``, ``bias``): the origin branch takes what the other
    branches do not give (Eq. 6 / Eq. 10); a grown origin passes its share on to its own origin."""
    others = []
    for name, branch in block.branches.items():
        if name != "origin":
            k, b = branch.kernel_bias()
            others.append(algebra.fuse_conv_bn(k, block.norms[name], b))
    if others:
        k_rest, b_rest = algebra.add_branches(*others)
        kernel, bias = kernel - k_rest, bias - b_rest
    origin, norm = block.branches["origin"], block.norms["origin"]
    norm.reset_parameters()  # gamma 1, beta 0, mean 0, var 1
    norm.bias.copy_(bias)
    scaled = kernel * (norm.running_var + norm.eps).sqrt().reshape(-1, 1, 1, 1)  # the BN divides by sqrt(1 + eps)
    if isinstance(origin, Grown):
        assign_origin(origin.block, scaled, torch.zeros_like(bias))
    else:
        origin.weight.copy_(scaled)


@torch.no_grad()
def grown_block(kernel: Tensor, bias: Tensor, geometry: ConvGeometry, ops: tuple[str, ...] = OPS,
                gamma: float = GAMMA, generator: torch.Generator | None = None,
                recalibrate=None) -> MultiBranchConv:
    """The grown block standing for the conv (``kernel``, ``bias``) of ``geometry`` (Rep, Eq. 6): the ops this
    geometry allows, new branches initialised as :func:`init_branch`, ``recalibrate(block)`` (BN statistics of the
    new branches from training batches, the official code's 20) before the origin absorbs the difference."""
    ops = allowed_ops(geometry, ops)
    block = MultiBranchConv(geometry, ops, form="offline_bn", post_norm=False, first_init="kaiming")
    block.to(device=kernel.device, dtype=kernel.dtype)
    for name in ops:
        if name != "origin":
            init_branch(block.branches[name], block.norms[name], gamma, generator)
    if recalibrate is not None:
        recalibrate(block)
    assign_origin(block, kernel, bias)
    return block


def grow(parent: nn.Module, name: str, ops: tuple[str, ...] = OPS, gamma: float = GAMMA,
         generator: torch.Generator | None = None, recalibrate=None) -> MultiBranchConv:
    """Grow the conv site ``parent.<name>`` in place: a ConvBN's ``conv`` (``name="conv"``) or a grown block's
    origin branch (``parent`` the grown block's ``branches``, ``name="origin"``: nested Rep). Returns the new block."""
    site = getattr(parent, name) if not isinstance(parent, nn.ModuleDict) else parent[name]
    if isinstance(site, (MultiBranchConv, Grown)):
        raise ValueError(f"{name} has grown already; grow its origin branch instead")
    kernel, bias = kernel_bias_of(site)
    geometry = site.geometry if isinstance(site, Branch) else ConvGeometry.of(site)
    block = grown_block(kernel.detach(), bias.detach(), geometry, ops, gamma, generator, recalibrate)
    replacement = Grown(block) if isinstance(site, Branch) else block
    if isinstance(parent, nn.ModuleDict):
        parent[name] = replacement
    else:
        setattr(parent, name, replacement)
    return block


@torch.no_grad()
def cut(block: MultiBranchConv, names: list[str] | tuple[str, ...]) -> None:
    """De-parameterize (Dep, Eq. 10): drop the branches ``names`` (never the origin), the origin absorbing them so
    that the block's eval-mode function is unchanged."""
    if "origin" in names:
        raise ValueError("the kxk branch ('origin') is never cut")
    unknown = set(names) - set(block.branches)
    if unknown:
        raise ValueError(f"no branches {sorted(unknown)} in this block (it has {list(block.branches)})")
    kernel, bias = block.equivalent_kernel_bias()
    for name in names:
        del block.branches[name]
        del block.norms[name]
    assign_origin(block, kernel, bias)


@torch.no_grad()
def collapse(host: ConvBN) -> None:
    """A grown block left with its origin alone becomes a plain conv again (with bias), as the official code does."""
    block = host.conv
    if not isinstance(block, MultiBranchConv) or list(block.branches) != ["origin"]:
        raise ValueError("only a grown block left with its origin alone collapses")
    kernel, bias = block.equivalent_kernel_bias()
    g = block.geometry
    conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
                     bias=True, device=kernel.device, dtype=kernel.dtype)
    conv.weight.copy_(kernel)
    conv.bias.copy_(bias)
    host.conv = conv


def branch_importance(block: MultiBranchConv) -> dict[str, float]:
    """Eq. 9 relative to the kxk branch, as the official code weighs branches: mean |gamma| of each branch's last BN
    over the origin's (the origin itself 1)."""
    origin = block.norms["origin"].weight.abs().mean()
    return {name: float(block.norms[name].weight.abs().mean() / origin) for name in block.branches}


def sites(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every kxk (k > 1) conv DyRep may grow, by name: ConvBN convs not grown yet, the origin branch of every grown
    block (nested Rep) and the 3x3 branch of every RepVGG block (DyRep Table 4: the official code grows the 3x3 conv
    inside timm's RepVGG training blocks, whose 1x1 and identity branches stay), each as (parent, attribute)."""
    out, grown = {}, _grown_blocks(model)  # one walk, not one per block: the saliency reads sites every step
    for name, module in model.named_modules():
        if isinstance(module, ConvBN) and isinstance(module.conv, nn.Conv2d) and module.conv.kernel_size[0] > 1:
            out[f"{name}.conv"] = (module, "conv")
        elif isinstance(module, MultiBranchConv) and module.form == "offline_bn" and \
                isinstance(module.branches["origin"], Conv) and module.geometry.kernel_size > 1 and \
                module.post_bn is None and (module in grown or isinstance(module, RepVGGBlock)):
            out[f"{name}.branches.origin"] = (module.branches, "origin")
    return out


def _grown_blocks(model: nn.Module) -> set[MultiBranchConv]:
    grown = {m.conv for m in model.modules() if isinstance(m, ConvBN) and isinstance(m.conv, MultiBranchConv)}
    grown |= {m.block for m in model.modules() if isinstance(m, Grown)}
    return grown


def rebuild(model: nn.Module, events: list[dict]) -> nn.Module:
    """The structure that recorded ``events`` (``{"kind", "site", "branches", ...}``: a grown run's grow / cut /
    collapse events, in order) describe, built on ``model`` (the plain network they started from) so that the grown
    run's train-form weights load into it strictly. New parameters are placeholders until those weights load."""
    for event in events:
        kind, site, branches = event["kind"], event["site"], list(event.get("branches") or [])
        if kind == "grow":
            grow(*sites(model)[site], ops=tuple(branches))
        elif kind == "cut":
            cut(model.get_submodule(site), branches)
        elif kind == "collapse":
            collapse(model.get_submodule(site.rsplit(".", 1)[0]))
        else:
            raise ValueError(f"unknown structure event {kind!r}")
    return model
