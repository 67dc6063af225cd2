"""The linear branches a re-parameterization block is made of.

Each branch is one path of a block's figure (DBB Fig. 2, OREPA Fig. 5, RepVGG Fig. 2, ACNet Fig. 2) and can do two
things: run on a feature map (``forward``, the offline / branch-by-branch form) and say which single kxk conv it is
(``kernel_bias``, merged with :mod:`backbones.algebra`). With ``mid_norm`` a two-stage branch carries DBB's
intermediate BatchNorm (padded with its response to zero, so the chain stays exactly mergeable).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import algebra, lean


@dataclass(frozen=True)
class ConvGeometry:
    """Where a block sits: the kxk conv it deploys to."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None  # None: k // 2 * dilation ("same" for stride 1)
    dilation: int = 1
    groups: int = 1

    def __post_init__(self):
        if self.padding is None:
            object.__setattr__(self, "padding", self.kernel_size // 2 * self.dilation)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"channels {self.in_channels}->{self.out_channels} not divisible by groups {self.groups}")

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        """The geometry of an existing square-kernel, zero-padded conv."""
        (k, kw), (p, pw), (d, dw), (s, sw) = conv.kernel_size, conv.padding, conv.dilation, conv.stride
        if k != kw or p != pw or d != dw or s != sw or conv.padding_mode != "zeros":
            raise ValueError(f"a block takes square, zero-padded convs, got {conv}")
        return cls(conv.in_channels, conv.out_channels, k, s, p, d, conv.groups)

    def conv(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def small_kernel_padding(self, kh: int, kw: int) -> list[int]:
        """F.pad amounts (negative = crop) that make a centred kh x kw conv equal the zero-padded kxk conv."""
        ph = self.padding - self.dilation * (self.kernel_size - kh) // 2
        pw = self.padding - self.dilation * (self.kernel_size - kw) // 2
        return [pw, pw, ph, ph]


def kaiming_(weight: Tensor, a: float) -> Tensor:
    return nn.init.kaiming_uniform_(weight, a=a)


def pad_with_values(x: Tensor, pad: int, values: Tensor | None) -> Tensor:
    """Zero padding, or DBB's BNAndPad: pad with a per-channel value (the BN's output for a zero input)."""
    if pad == 0:
        return x
    if values is None:
        return F.pad(x, [pad] * 4)
    v = values.reshape(1, -1, 1, 1)
    return F.pad(x - v, [pad] * 4) + v


def bn_zero_response(bn: nn.BatchNorm2d) -> Tensor:
    """What an eval-mode BN outputs for a zero input. DBB's BNAndPadLayer pads with this value in training too
    (running statistics, detached affine parameters); so do we."""
    return bn.bias.detach() - bn.running_mean * bn.weight.detach() / (bn.running_var + bn.eps).sqrt()


class Branch(nn.Module, ABC):
    """One linear path of a block. Subclasses define ``forward`` and ``kernel_bias``."""

    def __init__(self, geometry: ConvGeometry):
        super().__init__()
        self.geometry = geometry

    @abstractmethod
    def kernel_bias(self) -> tuple[Tensor, Tensor | None]:
        """The branch as one kxk conv: (kernel, bias or None)."""

    def scaled_kernel(self, scale: Tensor | None) -> Tensor:
        """``scale`` (per output channel, or one value) times this branch's kernel (a branch without mid norm).
        Branches override it to apply the scale to their smallest factor: OREPA's online squeeze runs every
        forward, so this is on the training hot path."""
        kernel = self.kernel_bias()[0]
        return kernel if scale is None else kernel * scale.reshape(-1, 1, 1, 1)


class Conv(Branch):
    """A plain conv of size kh x kw centred in the block's kxk window: the kxk origin, 1x1, and ACNet's 1xk / kx1."""

    def __init__(self, geometry: ConvGeometry, kh: int | None = None, kw: int | None = None, init_a: float = 0.0):
        super().__init__(geometry)
        g = geometry
        self.kh, self.kw = kh or g.kernel_size, kw or g.kernel_size
        self.weight = nn.Parameter(kaiming_(torch.empty(g.out_channels, g.in_channels // g.groups, self.kh, self.kw),
                                            init_a))

    def forward(self, x):
        g = self.geometry
        pw, _, ph, _ = g.small_kernel_padding(self.kh, self.kw)
        if min(ph, pw) >= 0:  # the conv pads by itself: no padded copy of the input is made (and kept for backward)
            return F.conv2d(x, self.weight, None, g.stride, (ph, pw), g.dilation, g.groups)
        return F.conv2d(F.pad(x, [pw, pw, ph, ph]), self.weight, None, g.stride, 0, g.dilation, g.groups)

    def kernel_bias(self):
        return self.scaled_kernel(None), None

    def scaled_kernel(self, scale):
        weight = self.weight if scale is None else self.weight * scale.reshape(-1, 1, 1, 1)
        k = self.geometry.kernel_size
        if (self.kh, self.kw) == (k, k):
            return weight
        return F.pad(weight, [(k - self.kw) // 2] * 2 + [(k - self.kh) // 2] * 2)


class Identity(Branch):
    """RepVGG's identity path (needs in == out and stride 1)."""

    def __init__(self, geometry: ConvGeometry):
        if geometry.in_channels != geometry.out_channels or geometry.stride != 1:
            raise ValueError("an identity branch needs in_channels == out_channels and stride 1")
        super().__init__(geometry)

        self.register_buffer("kernel", algebra.identity_kernel(geometry.out_channels, geometry.kernel_size,
                                                               geometry.groups), persistent=False)

    def forward(self, x):
        return x

    def kernel_bias(self):
        return self.kernel, None

    def scaled_kernel(self, scale):
        return self.kernel if scale is None else self.kernel * scale.reshape(-1, 1, 1, 1)


class OneByOneThenFilter(Branch):
    """1x1 conv, then a fixed per-channel kxk filter: OREPA's 1x1-avg (the filter is 1/k^2, i.e. average pooling)
    and 1x1-frequency-prior branch (the filter is OREPA supplement Table 1's cosine basis).

    ``pointwise=False`` drops the 1x1 (a fixed identity, no BN after it): the depthwise DBB's avg branch, which is
    average pooling alone (official-code notes Sec. 2.1); it needs a depthwise geometry (groups == in == out).
    """

    def __init__(self, geometry: ConvGeometry, kind: str, mid_norm: bool = False, init_a: float = 0.0,
                 pointwise: bool = True):
        super().__init__(geometry)
        g = geometry
        self.kind = kind
        self.pointwise = pointwise
        if pointwise:
            self.conv1x1 = nn.Parameter(kaiming_(torch.empty(g.out_channels, g.in_channels // g.groups, 1, 1), init_a))
        elif g.groups == g.in_channels == g.out_channels:
            self.register_buffer("conv1x1", torch.ones(g.out_channels, 1, 1, 1), persistent=False)
            mid_norm = False
        else:
            raise ValueError(f"a {kind} filter without its 1x1 needs a depthwise conv (groups == in == out), got {g}")
        if kind == "prior":
            self.register_buffer("prior", frequency_prior(g.out_channels, g.kernel_size), persistent=False)
        elif kind != "avg":
            raise ValueError(f"unknown filter {kind!r}")
        self.mid_bn = nn.BatchNorm2d(g.out_channels) if mid_norm else None

    def forward(self, x):
        g = self.geometry
        y = F.conv2d(x, self.conv1x1, None, 1, 0, 1, g.groups) if self.pointwise else x
        if self.mid_bn is not None:
            y = self.mid_bn(y)
        y = pad_with_values(y, g.padding, None if self.mid_bn is None else bn_zero_response(self.mid_bn))
        if self.kind == "avg" and g.dilation == 1:
            return F.avg_pool2d(y, g.kernel_size, g.stride)
        return F.conv2d(y, self.filter().unsqueeze(1), None, g.stride, 0, g.dilation, g.out_channels)

    def filter(self) -> Tensor:
        """(O, k, k): built in the parameters' dtype so that 1/k^2 is exact in float64 too."""
        if self.kind == "prior":
            return self.prior
        k = self.geometry.kernel_size
        return self.conv1x1.new_full((self.geometry.out_channels, k, k), 1.0 / k ** 2)

    def kernel_bias(self):
        w, b = self.conv1x1, None
        if self.mid_bn is not None:
            w, b = algebra.fuse_conv_bn(w, self.mid_bn)
        filt = self.filter()
        kernel = w * filt.unsqueeze(1)  # (O, I/g, 1, 1) x (O, 1, k, k): a depthwise filter after a 1x1
        return kernel, None if b is None else b * filt.sum((1, 2))

    def scaled_kernel(self, scale):
        w = self.conv1x1 if scale is None else self.conv1x1 * scale.reshape(-1, 1, 1, 1)
        return w * self.filter().unsqueeze(1)


def frequency_prior(channels: int, k: int) -> Tensor:
    """OREPA supplement Table 1 ("Filtering"): the first half of the channels get a cosine along the height, the
    second half along the width, with the frequency growing with the channel index."""
    half = channels // 2
    c = torch.arange(channels, dtype=torch.float64).reshape(-1, 1, 1)
    pos = torch.arange(k, dtype=torch.float64) + 0.5
    rows = torch.cos((c + 1) * pos.reshape(1, k, 1) * math.pi / k).expand(channels, k, k)
    cols = torch.cos((c - half + 1) * pos.reshape(1, 1, k) * math.pi / k).expand(channels, k, k)
    return torch.where(c < half, rows, cols).to(torch.get_default_dtype())


class OneByOneKxK(Branch):
    """1x1 conv (to ``internal`` channels) then a kxk conv: DBB's and OREPA's 1x1-kxk branch, and with k = 1 the
    two-layer 1x1 of OREPA's Rep-1x1.

    ``first_init``: ``identity_delta`` (a zero parameter added to a fixed identity, DBB's IdentityBasedConv1x1),
    ``eye`` (a parameter initialised to the identity) or ``kaiming``; ``second_init``: ``kaiming`` or ``eye``.
    """

    def __init__(self, geometry: ConvGeometry, internal: int, mid_norm: bool = False, init_a: float = 0.0,
                 first_init: str = "identity_delta", second_init: str = "kaiming"):
        super().__init__(geometry)
        g = geometry
        if internal % g.groups:
            raise ValueError(f"internal channels {internal} not divisible by groups {g.groups}")
        self.internal = internal
        first = torch.empty(internal, g.in_channels // g.groups, 1, 1)
        second = torch.empty(g.out_channels, internal // g.groups, g.kernel_size, g.kernel_size)
        if first_init in ("identity_delta", "eye"):
            identity = algebra.identity_kernel(internal, 1, internal // (g.in_channels // g.groups))
        if first_init == "identity_delta":
            nn.init.zeros_(first)
            self.register_buffer("first_identity", identity, persistent=False)
        elif first_init == "eye":
            first.copy_(identity)
        else:
            kaiming_(first, init_a)
        if second_init == "eye":
            second.copy_(algebra.identity_kernel(g.out_channels, g.kernel_size, g.out_channels // (internal // g.groups)))
        else:
            kaiming_(second, init_a)
        self.first = nn.Parameter(first)
        self.second = nn.Parameter(second)
        self.mid_bn = nn.BatchNorm2d(internal) if mid_norm else None

    def first_kernel(self):
        identity = getattr(self, "first_identity", None)
        return self.first if identity is None else self.first + identity

    def forward(self, x):
        g = self.geometry
        y = F.conv2d(x, self.first_kernel(), None, 1, 0, 1, g.groups)
        if self.mid_bn is not None:
            y = self.mid_bn(y)
        y = pad_with_values(y, g.padding, None if self.mid_bn is None else bn_zero_response(self.mid_bn))
        return F.conv2d(y, self.second, None, g.stride, 0, g.dilation, g.groups)

    def kernel_bias(self):
        first, first_bias = self.first_kernel(), None
        if self.mid_bn is not None:
            first, first_bias = algebra.fuse_conv_bn(first, self.mid_bn)
        return algebra.compose_sequential(first, self.second, self.geometry.groups, first_bias)

    def scaled_kernel(self, scale):
        return lean.scaled_compose_1x1_kxk(self.first_kernel(), self.second, scale, self.geometry.groups)


class DepthwisePointwise(Branch):
    """OREPA's linear depthwise-separable branch: depthwise kxk with channel multiplier 8, then a 1x1."""

    def __init__(self, geometry: ConvGeometry, multiplier: int = 8, mid_norm: bool = False, init_a: float = 0.0):
        super().__init__(geometry)
        g = geometry
        self.multiplier = multiplier
        mid = g.in_channels * multiplier
        self.depthwise = nn.Parameter(kaiming_(torch.empty(mid, 1, g.kernel_size, g.kernel_size), init_a))
        self.pointwise = nn.Parameter(kaiming_(torch.empty(g.out_channels, mid // g.groups, 1, 1), init_a))
        self.mid_bn = nn.BatchNorm2d(mid) if mid_norm else None

    def forward(self, x):
        g = self.geometry
        y = F.conv2d(x, self.depthwise, None, g.stride, g.padding, g.dilation, g.in_channels)
        if self.mid_bn is not None:
            y = self.mid_bn(y)
        return F.conv2d(y, self.pointwise, None, 1, 0, 1, g.groups)

    def kernel_bias(self):
        dw, dw_bias = self.depthwise, None
        if self.mid_bn is not None:
            dw, dw_bias = algebra.fuse_conv_bn(dw, self.mid_bn)
        return algebra.depthwise_pointwise_kernel(dw, self.pointwise, self.multiplier, self.geometry.groups, dw_bias)

    def scaled_kernel(self, scale):
        return lean.scaled_depthwise_pointwise(self.depthwise, self.pointwise, scale, self.multiplier,
                                               self.geometry.groups)
