"""Re-parameterization blocks: each trains as several linear branches and deploys to one ``nn.Conv2d``.

The protocol is :class:`ReparamBlock`: a block knows its deploy geometry and its ``equivalent_kernel_bias()``;
:func:`backbones.deploy` walks a model and swaps every block for the conv it is equivalent to.

All multi-branch blocks are one class, :class:`MultiBranchConv`, in one of three forms:

* ``offline_bn``  -- every branch runs on the feature map and ends in its own BN (DBB, ACNet, RepVGG; the paper's
  "offline" counterparts of OREPA);
* ``online``      -- OREPA: the branches' kernels are scaled per channel, summed, and one conv touches the feature
  map, followed by one post-addition BN;
* ``linear_offline`` -- the same parameters as ``online`` but every branch runs on the feature map, no branch norm
  (the test oracle of the online form, and OREPA Table 1's "w/o branch-wise norm").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import algebra
from .branches import (Conv, ConvGeometry, DepthwisePointwise, Identity, OneByOneKxK, OneByOneThenFilter)

FORMS = ("online", "linear_offline", "offline_bn")
SCALINGS = ("vector", "scalar", "none")

# OREPA's scaling-vector initialisation (official code, blocks.py) and the paper's (supplement Sec. 2.1); they differ
# only in the 1x1-avg branch. The identity value is ours (RepVGG-Online has no published init).
SCALE_INIT = {
    "code": {"origin": 0.25, "avg": 0.25, "avg_only": 0.25, "prior": 0.0, "1x1_kxk": 0.5, "1x1": 1.0, "dw_pw": 0.5,
             "identity": 1.0},
    "paper": {"origin": 0.25, "avg": 0.5, "avg_only": 0.5, "prior": 0.0, "1x1_kxk": 0.5, "1x1": 1.0, "dw_pw": 0.5,
              "identity": 1.0},
}
TORCH_CONV_INIT_A = math.sqrt(5)  # nn.Conv2d's default init, which DBB, ACNet and RepVGG keep


class ReparamBlock(nn.Module, ABC):
    """A training-time block equivalent (in eval mode) to one kxk conv with bias."""

    geometry: ConvGeometry

    @abstractmethod
    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The (kernel, bias) of the conv this block equals in eval mode; differentiable."""

    @torch.no_grad()
    def to_deploy(self) -> nn.Conv2d:
        g = self.geometry
        kernel, bias = self.equivalent_kernel_bias()
        conv = nn.utils.skip_init(nn.Conv2d, g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding,
                                  g.dilation, g.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)  # skip_init: no random init of weights that are overwritten at once
        conv.bias.copy_(bias)
        return conv


class ConvBN(ReparamBlock):
    """A plain conv + BN (the "None" baseline); deploys by Transform I. ``conv`` / ``bn``: existing modules to hold
    instead of new ones (a torchvision network's conv-BN pairs, backbones/zoo.py; the conv may have a bias)."""

    def __init__(self, geometry: ConvGeometry, conv: nn.Conv2d | None = None, bn: nn.BatchNorm2d | None = None):
        super().__init__()
        g = self.geometry = geometry
        self.conv = conv if conv is not None else nn.Conv2d(g.in_channels, g.out_channels, g.kernel_size, g.stride,
                                                            g.padding, g.dilation, g.groups, bias=False)
        self.bn = bn if bn is not None else nn.BatchNorm2d(g.out_channels)

    @classmethod
    def of(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> ConvBN:
        """The block made of an existing square-kernel, zero-padded conv and the BN that follows it."""
        return cls(ConvGeometry.of(conv), conv, bn)

    def forward(self, x):
        return self.bn(self.conv(x))

    def equivalent_kernel_bias(self):
        if isinstance(self.conv, ReparamBlock):  # the conv grew into a multi-branch block (DyRep, backbones/dyrep.py)
            kernel, bias = self.conv.equivalent_kernel_bias()
            return algebra.fuse_conv_bn(kernel, self.bn, bias)
        return algebra.fuse_conv_bn(self.conv.weight, self.bn, self.conv.bias)


class MultiBranchConv(ReparamBlock):
    """Parallel linear branches of one kxk conv geometry (see the module docstring for the three forms).

    ``scaling`` (online / linear_offline only): ``vector`` (one trainable factor per branch and output channel),
    ``scalar`` (one per branch) or ``none``; ``post_norm``: the single post-addition BN.
    """

    def __init__(self, geometry: ConvGeometry, branches: tuple[str, ...], form: str = "online",
                 scaling: str = "vector", post_norm: bool = True, init: str = "code", init_a: float = 0.0,
                 internal: int | None = None, first_init: str = "identity_delta", second_init: str = "kaiming",
                 scale_init: dict[str, float] | None = None):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")
        if init not in SCALE_INIT:
            raise ValueError(f"unknown init {init!r}; expected one of {tuple(SCALE_INIT)}")
        if not branches or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct and non-empty, got {branches}")
        g = self.geometry = geometry
        self.form = form
        mid_norm = form == "offline_bn"
        internal = internal or g.in_channels
        builders = {
            "origin": lambda: Conv(g, init_a=init_a),
            "1x1": lambda: Conv(g, 1, 1, init_a=init_a),
            "hor": lambda: Conv(g, 1, g.kernel_size, init_a=init_a),
            "ver": lambda: Conv(g, g.kernel_size, 1, init_a=init_a),
            "identity": lambda: Identity(g),
            "avg": lambda: OneByOneThenFilter(g, "avg", mid_norm, init_a),
            "avg_only": lambda: OneByOneThenFilter(g, "avg", mid_norm, init_a, pointwise=False),
            "prior": lambda: OneByOneThenFilter(g, "prior", mid_norm, init_a),
            "1x1_kxk": lambda: OneByOneKxK(g, internal, mid_norm, init_a, first_init, second_init),
            "dw_pw": lambda: DepthwisePointwise(g, 8, mid_norm, init_a),
        }
        unknown = set(branches) - set(builders)
        if unknown:
            raise ValueError(f"unknown branches {sorted(unknown)}; known: {sorted(builders)}")
        self.branches = nn.ModuleDict({name: builders[name]() for name in branches})
        if mid_norm:
            if post_norm:
                raise ValueError("offline_bn has a BN per branch; post_norm must be off")
            self.norms = nn.ModuleDict({name: nn.BatchNorm2d(g.out_channels) for name in branches})
            self.scale = None
        else:
            init_values = {**SCALE_INIT[init], **(scale_init or {})}
            values = torch.tensor([init_values[name] for name in branches])
            if scaling == "vector":
                self.scale = nn.Parameter(values.unsqueeze(1).repeat(1, g.out_channels))
            elif scaling == "scalar":
                self.scale = nn.Parameter(values.unsqueeze(1))
            else:
                self.scale = None
        self.post_bn = nn.BatchNorm2d(g.out_channels) if post_norm else None

    def _scaled_map(self, index: int, y: Tensor) -> Tensor:
        """A branch's feature map times its scale (the linear_offline form)."""
        return y if self.scale is None else y * self.scale[index].reshape(1, -1, 1, 1)

    def squeezed_kernel(self) -> Tensor:
        """Sum over branches of scaling * branch kernel: the one conv of the online form (before the post BN).
        Each branch folds its scale into its smallest factor; the sum is accumulated, not stacked."""
        kernel = None
        for i, branch in enumerate(self.branches.values()):
            term = branch.scaled_kernel(None if self.scale is None else self.scale[i])
            kernel = term if kernel is None else kernel + term
        return kernel

    def forward(self, x):
        if self.form == "online":
            y = self.geometry.conv(x, self.squeezed_kernel())
        elif self.form == "linear_offline":
            y = sum(self._scaled_map(i, b(x)) for i, b in enumerate(self.branches.values()))
        else:
            y = sum(self.norms[name](b(x)) for name, b in self.branches.items())
        return y if self.post_bn is None else self.post_bn(y)

    def equivalent_kernel_bias(self):
        if self.form == "offline_bn":
            pairs = []
            for name, branch in self.branches.items():
                kernel, bias = branch.kernel_bias()
                pairs.append(algebra.fuse_conv_bn(kernel, self.norms[name], bias))
            return algebra.add_branches(*pairs)
        kernel = self.squeezed_kernel()
        if self.post_bn is None:
            return kernel, kernel.new_zeros(kernel.shape[0])
        return algebra.fuse_conv_bn(kernel, self.post_bn)


# --- the papers' blocks, as presets of MultiBranchConv -------------------------------------------------------------

OREPA_BRANCHES = ("origin", "avg", "prior", "1x1_kxk", "1x1", "dw_pw")  # OREPA Fig. 5 (kxk block)
DBB_BRANCHES = ("origin", "1x1", "avg", "1x1_kxk")                     # DBB Fig. 2
# the depthwise DBB (groups == channels; DBB's MobileNet): no 1x1 branch, average pooling without its 1x1
DBB_DEPTHWISE = {"1x1": None, "avg": "avg_only"}
OREPA_VGG_DENSE_BRANCHES = ("origin", "avg", "prior", "1x1_kxk", "dw_pw")  # OREPA-VGG's online 3x3 (no plain 1x1)
REPVGG_BRANCHES = ("origin", "1x1", "identity")


def repvgg_branches(geometry: ConvGeometry) -> tuple[str, ...]:
    """RepVGG keeps its identity branch only where it exists: in == out and stride 1."""
    has_identity = geometry.in_channels == geometry.out_channels and geometry.stride == 1
    return REPVGG_BRANCHES if has_identity else REPVGG_BRANCHES[:2]


class DBB(MultiBranchConv):
    """Diverse Branch Block (Ding et al., CVPR 2021): kxk, 1x1, 1x1-avg and 1x1-kxk branches, each with its BN
    (``branches``: another set of the same algebra, e.g. DyRep Table 8's DBB over DyRep's seven ops).

    ``form="linear_offline", scaling="none"`` is OREPA Table 1's "w/o branch-wise norm": the same branches, linear,
    one post-addition BN.

    A depthwise conv (groups == in == out, DBB's MobileNet) gets the official code's depthwise DBB: no 1x1 branch
    (it would be a per-channel scale), average pooling without the 1x1 before it, and a 1x1-kxk branch through 2 x in
    internal channels whose 1x1 is a plain (kaiming) conv, not the identity-based one (official-code notes Sec. 2.1).
    """

    def __init__(self, geometry: ConvGeometry, form: str = "offline_bn", scaling: str = "none",
                 post_norm: bool = False, branches: tuple[str, ...] = DBB_BRANCHES):
        g, first_init = geometry, "identity_delta"
        internal = g.in_channels  # DBB: in if groups < out else 2 * in
        if g.groups >= g.out_channels:
            if not g.groups == g.in_channels == g.out_channels:
                raise ValueError(f"a DBB with groups >= out channels must be depthwise (groups == in == out), got {g}")
            branches = tuple(DBB_DEPTHWISE.get(b, b) for b in branches if DBB_DEPTHWISE.get(b, b))
            internal, first_init = 2 * g.in_channels, "kaiming"
        super().__init__(geometry, branches, form=form, scaling=scaling, post_norm=post_norm,
                         internal=internal, init_a=TORCH_CONV_INIT_A, first_init=first_init)


class ACB(MultiBranchConv):
    """Asymmetric Convolution Block (ACNet, Ding et al., ICCV 2019): kxk, 1xk and kx1 convs, each with its BN."""

    def __init__(self, geometry: ConvGeometry):
        super().__init__(geometry, ("origin", "hor", "ver"), form="offline_bn", post_norm=False,
                         init_a=TORCH_CONV_INIT_A)


class RepVGGBlock(MultiBranchConv):
    """RepVGG block (Ding et al., CVPR 2021): 3x3+BN, 1x1+BN and (where shapes allow) identity BN.

    ``form="online"`` is OREPA supplement Table 3's RepVGG-Online (1x1 and identity squeezed into the 3x3 with
    vector scaling and one BN); ``form="linear_offline"`` with ``scaling="none"`` is Table 1's "w/o branch-wise norm".
    """

    def __init__(self, geometry: ConvGeometry, form: str = "offline_bn", scaling: str = "vector",
                 post_norm: bool = False):
        super().__init__(geometry, repvgg_branches(geometry), form=form, scaling=scaling, post_norm=post_norm,
                         init_a=TORCH_CONV_INIT_A)


class OREPA(MultiBranchConv):
    """Online Re-parameterization kxk block (Hu et al., CVPR 2022, Fig. 5): six linear branches with per-branch
    channel scaling, squeezed into one kernel every forward, then one post-addition BN."""

    def __init__(self, geometry: ConvGeometry, branches: tuple[str, ...] = OREPA_BRANCHES, form: str = "online",
                 scaling: str = "vector", post_norm: bool = True, init: str = "code"):
        internal = geometry.in_channels if geometry.groups <= 4 else 2 * geometry.in_channels  # official code
        super().__init__(geometry, tuple(branches), form=form, scaling=scaling,
                         post_norm=post_norm and form != "offline_bn", init=init, internal=internal)


class OREPA1x1(MultiBranchConv):
    """OREPA's Rep-1x1 for bottleneck 1x1s: a 1x1 plus a two-layer linear 1x1 (one factor starts as the identity,
    the larger side kept, as in the official code), scaled 1.0 and 0.5, one post BN.

    ``scaling`` and ``post_norm`` follow the network's OREPA variant (Table 3's scalar / no scaling / no post-norm
    apply to every OREPA block, Rep-1x1 included), so that the recorded variant describes every block that trained.
    """

    def __init__(self, geometry: ConvGeometry, form: str = "online", scaling: str = "vector",
                 post_norm: bool = True):
        if geometry.kernel_size != 1 or geometry.groups != 1:
            raise ValueError("Rep-1x1 is a dense 1x1 conv")
        wider_out = geometry.out_channels > geometry.in_channels
        super().__init__(geometry, ("origin", "1x1_kxk"), form=form, scaling=scaling,
                         post_norm=post_norm and form != "offline_bn", init_a=1.0,
                         internal=geometry.in_channels if wider_out else geometry.out_channels,
                         first_init="eye" if wider_out else "kaiming", second_init="kaiming" if wider_out else "eye",
                         scale_init={"origin": 1.0, "1x1_kxk": 0.5})


class OREPADeepStem(ReparamBlock):
    """OREPA's linear deep stem: three 3x3 OREPA kernels (3->C, C->C, C->C) composed into one 7x7/s2 conv + BN.

    ``linear_offline`` runs the three convs on the input padded by 3, each unpadded (the last with stride 2); this
    is exactly the composed 7x7 (three *padded* 3x3 convs would differ at the borders). ``offline_bn`` does the same
    with a BN after every branch (the paper's offline stem of Figure 8). ``post_norm=False`` (Table 3's "w/o
    post-addition norm", applied network-wide) drops the stem's BN too.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, form: str = "online",
                 branches: tuple[str, ...] = OREPA_BRANCHES, scaling: str = "vector", init: str = "code",
                 post_norm: bool = True):
        super().__init__()
        self.geometry = ConvGeometry(in_channels, out_channels, 7, stride, 3)
        self.form = form
        channels = [in_channels, out_channels, out_channels, out_channels]
        self.layers = nn.ModuleList(
            OREPA(ConvGeometry(channels[i], channels[i + 1], 3, stride if i == 2 else 1, 0), branches, form,
                  scaling, post_norm=False, init=init)
            for i in range(3))
        self.post_bn = nn.BatchNorm2d(out_channels) if post_norm and form != "offline_bn" else None

    def squeezed_kernel(self) -> Tensor:
        kernel = self.layers[0].squeezed_kernel()
        for layer in self.layers[1:]:
            kernel, _ = algebra.compose_sequential(kernel, layer.squeezed_kernel())
        return kernel

    def forward(self, x):
        if self.form == "online":
            y = self.geometry.conv(x, self.squeezed_kernel())
        else:
            y = F.pad(x, [3] * 4)
            for layer in self.layers:
                y = layer(y)
        return y if self.post_bn is None else self.post_bn(y)

    def equivalent_kernel_bias(self):
        kernel, bias = self.layers[0].equivalent_kernel_bias()
        for layer in self.layers[1:]:
            k2, b2 = layer.equivalent_kernel_bias()
            kernel, bias = algebra.compose_sequential(kernel, k2, 1, bias, b2)
        if self.post_bn is None:
            return kernel, bias
        return algebra.fuse_conv_bn(kernel, self.post_bn, bias)


class ParallelBlocks(ReparamBlock):
    """Blocks on the same input whose outputs are summed; smaller kernels are centred in the largest (Transform VI)."""

    def __init__(self, geometry: ConvGeometry, **blocks: ReparamBlock):
        super().__init__()
        self.geometry = geometry
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, x):
        return sum(block(x) for block in self.blocks.values())

    def equivalent_kernel_bias(self):
        pairs = []
        for block in self.blocks.values():
            kernel, bias = block.equivalent_kernel_bias()
            pairs.append((algebra.pad_kernel(kernel, self.geometry.kernel_size), bias))
        return algebra.add_branches(*pairs)


def orepa_vgg_block(geometry: ConvGeometry, form: str = "online") -> ReparamBlock:
    """OREPA-VGG (OREPA Fig. 5, supplement Table 3): RepVGG's 1x1+BN and identity BN kept as they are, its 3x3
    replaced by an online OREPA kernel (origin, 1x1-avg, prior, 1x1-kxk, dw-pw; init a=1 as the official code).
    ``form="offline_bn"`` is OREPAVGG-Offline: all seven branches on the feature map, each with its BN."""
    branches = OREPA_VGG_DENSE_BRANCHES + repvgg_branches(geometry)[1:]
    internal = geometry.in_channels if geometry.groups < geometry.out_channels else 2 * geometry.in_channels
    if form == "offline_bn":
        return MultiBranchConv(geometry, branches, "offline_bn", post_norm=False, init_a=1.0, internal=internal)
    if form != "online":
        raise ValueError(f"OREPA-VGG has the forms online and offline_bn, not {form!r}")
    parts = {"dense": MultiBranchConv(geometry, OREPA_VGG_DENSE_BRANCHES, "online", init_a=1.0, internal=internal),
             "conv1x1": ConvBN(ConvGeometry(geometry.in_channels, geometry.out_channels, 1, geometry.stride, 0,
                                            1, geometry.groups))}
    if "identity" in branches:
        parts["identity"] = MultiBranchConv(geometry, ("identity",), "offline_bn", post_norm=False)
    return ParallelBlocks(geometry, **parts)
