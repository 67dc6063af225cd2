"""RepNeXt (Li, Yang, He, Qi; ../shared/papers/repnext.md) and the ConvNeXt chain it is derived from (its Table 5).

No official code exists: this is written from the text, Eq. 1-8, Table 1 and the figure captions. The chain, each
step on top of the previous one (Table 5), is one network class with a ``step``:

* ``convnext``   ConvNeXt (Liu et al. 2022): 4x4/4 stem + LN, LN + 2x2/2 downsampling, blocks dw7x7 -> LN -> Linear
  (4C) -> GELU -> Linear (C) -> layer scale -> drop path, + x; GAP -> LN -> Linear head.
* ``lc2pwconv``  the pointwise Linear layers as 1x1 convs (LN over channels in NCHW).
* ``ln2bn``      every LN a BN (block, stem, downsampling, head): the block's BN follows the dw conv.
* ``shortcut_act`` the shortcut carries the block's activation: ``main(x) + act(x)`` (Sec. 3.1, Fig. 3a).
* ``repnext``    the dw7x7 + BN becomes a RepUnit (its BN(s) are the block's BN): RepNeXt.

Choices the text leaves open, each recorded in the network's RepConfig (backbones/variants.py) or stated here:

* the block's normalization is the RepUnit's own BN(s) (the BN that replaced ConvNeXt's LN after the dw conv), and
  the pointwise convs carry a bias as ConvNeXt's Linear layers do (no BN after them): ``Lc2pwconv`` changes only
  how they are implemented;
* ConvNeXt's layer scale (``layer_scale``, init 1e-6) and drop path (``drop_path``, the last block's rate, linear in
  depth as ConvNeXt) stay in every step; the layer scale folds into pw_2 at deploy;
* RepUnit3's 3x1 and 1x5 kernels are centred ("same" padding (1, 0) and (0, 2)): they pad to 7x7 exactly;
* RepUnit1 splits C channels into thirds as evenly as possible, the first parts one larger where 3 does not divide C
  (RepNeXt-B's 128: 43 / 43 / 42);
* the shortcut re-parameterization interleaves the dirac kernels after each depthwise kernel (Sec. 3.2 instruction 1:
  group g of the 7x7 groupwise conv outputs [dw_g, channel g]); pw_1^rep's zero columns sit on the identity channels.

Deploy levels (backbones.deploy): ``deploy(model)`` is the regular re-parameterization (rRep: RepUnit -> one 7x7
depthwise conv, BNs fused into their convs, the layer scale into pw_2, the head BN into the classifier);
``deploy(model, shortcut=True)`` the shortcut one (sRep, Eq. 5-8: each block a plain 7x7 (2C, groups C) -> 1x1 (5C)
-> act -> 1x1 (C) chain, exact for any activation); ``deploy(model, pointwise_as_linear=True)`` rRep with the
pointwise convs back as Linear layers on channels-last maps (Table 4's bracketed throughput).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import algebra
from .blocks import ConvBN, ReparamBlock
from .branches import ConvGeometry

STEPS = ("convnext", "lc2pwconv", "ln2bn", "shortcut_act", "repnext")
UNITS = {"u1": ((3, 3), (5, 5), (7, 7)), "u2": ((3, 3), (5, 5), (7, 7)), "u3": ((3, 1), (1, 5), (7, 7))}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def thirds(channels: int) -> list[int]:
    """RepUnit1's channel split: as even as possible, the first parts one larger where 3 does not divide."""
    return [channels // 3 + (1 if i < channels % 3 else 0) for i in range(3)]


def _depthwise(channels: int, kernel: tuple[int, int], bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=channels, bias=bias)


class RepUnit(ReparamBlock):
    """RepUnit1 (Eq. 1-2: 3x3 / 5x5 / 7x7 depthwise convs on channel thirds, concatenated, one BN), RepUnit2 (Eq. 3-4:
    three full-width depthwise branches, each with its BN, added) or RepUnit3 (RepUnit2 with 3x1 and 1x5 kernels);
    each equals one 7x7 depthwise conv with bias."""

    def __init__(self, channels: int, unit: str = "u3"):
        super().__init__()
        if unit not in UNITS:
            raise ValueError(f"unknown RepUnit {unit!r}; expected one of {sorted(UNITS)}")
        self.unit, self.geometry = unit, ConvGeometry(channels, channels, 7, groups=channels)
        self.splits = thirds(channels) if unit == "u1" else [channels] * 3
        self.convs = nn.ModuleList(_depthwise(c, k) for c, k in zip(self.splits, UNITS[unit]))
        self.norms = nn.ModuleList([nn.BatchNorm2d(channels)] if unit == "u1" else
                                   [nn.BatchNorm2d(channels) for _ in UNITS[unit]])

    def forward(self, x):
        if self.unit == "u1":
            return self.norms[0](torch.cat([conv(part) for conv, part in zip(self.convs, x.split(self.splits, 1))], 1))
        return sum(norm(conv(x)) for conv, norm in zip(self.convs, self.norms))

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernels = [algebra.pad_kernel(conv.weight, 7) for conv in self.convs]
        if self.unit == "u1":  # Eq. 2: depth-concatenate the padded kernels, then fuse the one BN
            kernel, _ = algebra.concat_depth(*((k, k.new_zeros(k.shape[0])) for k in kernels))
            return algebra.fuse_conv_bn(kernel, self.norms[0])
        return algebra.add_branches(*(algebra.fuse_conv_bn(k, norm) for k, norm in zip(kernels, self.norms)))


class BNConv(ReparamBlock):
    """RepNeXt's downsampling: a BN, then a 2x2 stride-2 conv (unpadded, so the BN folds into it exactly)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.geometry = ConvGeometry(in_channels, out_channels, 2, 2, 0)
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 2, 2)

    def forward(self, x):
        return self.conv(self.bn(x))

    def equivalent_kernel_bias(self):
        return algebra.fuse_bn_conv(self.bn, self.conv.weight, self.conv.bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's stem, downsampling, and Lc2pwconv's blocks)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class BNLinear(nn.Module):
    """The head after global pooling: BN (the LN's replacement from Ln2bn on) and the classifier; folds to a Linear."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(channels), nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.bn(x))

    @torch.no_grad()
    def deployed(self, **_) -> nn.Linear:
        kernel, bias = algebra.fuse_bn_conv(self.bn, self.fc.weight[:, :, None, None], self.fc.bias)
        fc = nn.Linear(self.fc.in_features, self.fc.out_features, device=kernel.device, dtype=kernel.dtype)
        fc.weight.copy_(kernel.flatten(1))
        fc.bias.copy_(bias)
        return fc


def _pointwise_linear(conv: nn.Conv2d) -> nn.Linear:
    linear = nn.Linear(conv.in_channels, conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
    return linear


def _conv(kernel: Tensor, bias: Tensor, groups: int = 1, padding: int = 0) -> nn.Conv2d:
    conv = nn.Conv2d(kernel.shape[1] * groups, kernel.shape[0], kernel.shape[-1], padding=padding, groups=groups,
                     device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


class NeXtBlock(nn.Module):
    """One block of the chain (module docstring); ``deployed`` gives its rRep or sRep form."""

    def __init__(self, dim: int, step: str, unit: str = "u3", act: str = "gelu", layer_scale: float = 1e-6,
                 drop_path: float = 0.0):
        super().__init__()
        if step == "repnext":
            self.dw = RepUnit(dim, unit)
        elif step in ("ln2bn", "shortcut_act"):
            self.dw = ConvBN.of(_depthwise(dim, (7, 7), bias=True), nn.BatchNorm2d(dim))
        else:
            self.dw = _depthwise(dim, (7, 7), bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if step == "convnext" else \
            LayerNorm2d(dim, eps=1e-6) if step == "lc2pwconv" else None
        self.linear = step == "convnext"  # ConvNeXt's pointwise layers: Linear on channels-last maps
        layer = (lambda i, o: nn.Linear(i, o)) if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.pw1, self.act, self.pw2 = layer(dim, 4 * dim), ACTIVATIONS[act](), layer(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale else None
        self.drop_path = drop_path
        self.shortcut_act = step in ("shortcut_act", "repnext")

    def forward(self, x):
        y = self.dw(x)
        if self.linear:
            y = y.permute(0, 2, 3, 1)
        if self.norm is not None:
            y = self.norm(y)
        y = self.pw2(self.act(self.pw1(y)))
        if self.gamma is not None:
            y = y * (self.gamma if self.linear else self.gamma.reshape(-1, 1, 1))
        if self.linear:
            y = y.permute(0, 3, 1, 2)
        if self.training and self.drop_path:  # stochastic depth per sample, as ConvNeXt
            keep = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) >= self.drop_path
            y = y * keep / (1 - self.drop_path)
        return y + (self.act(x) if self.shortcut_act else x)

    @torch.no_grad()
    def deployed(self, shortcut: bool = False, pointwise_as_linear: bool = False) -> nn.Module:
        """rRep (this block, its dw conv and BN one conv, the layer scale inside pw_2, pointwise layers as
        ``pointwise_as_linear`` asks) or sRep (``shortcut``: a plain nn.Sequential, no addition)."""
        if self.norm is not None:  # LN cannot fold: ConvNeXt and Lc2pwconv deploy as they are
            if shortcut:
                raise ValueError("only blocks without LayerNorm and with an activated shortcut (Shortcut-act, "
                                 "RepNeXt) are shortcut re-parameterizable")
            return self
        if isinstance(self.dw, ReparamBlock):
            self.dw = self.dw.to_deploy()
        if self.linear:  # deployed before with pointwise_as_linear: back to 1x1 convs, one path for what follows
            self.pw1, self.pw2 = (_conv(l.weight[:, :, None, None], l.bias) for l in (self.pw1, self.pw2))
            self.linear = False
        if self.gamma is not None:
            self.pw2.weight.mul_(self.gamma.reshape(-1, 1, 1, 1))
            self.pw2.bias.mul_(self.gamma)
            self.gamma = None
        if shortcut:
            if not self.shortcut_act:
                raise ValueError("only blocks whose shortcut carries the activation (Shortcut-act, RepNeXt) are "
                                 "shortcut re-parameterizable")
            c = self.dw.out_channels
            gw = _conv(*algebra.depthwise_with_identity(self.dw.weight, self.dw.bias), groups=c, padding=3)
            pw1 = _conv(*algebra.pointwise_with_identity(self.pw1.weight, self.pw1.bias))
            pw2 = _conv(*algebra.pointwise_add_identity(self.pw2.weight, self.pw2.bias))
            return nn.Sequential(gw, pw1, self.act, pw2)
        if pointwise_as_linear:
            self.pw1, self.pw2, self.linear = _pointwise_linear(self.pw1), _pointwise_linear(self.pw2), True
        return self


class NeXt(nn.Module):
    """ConvNeXt, the Table 5 steps and RepNeXt: a 4x4/4 stem, four stages of ``depths`` blocks at ``dims`` with
    2x2/2 downsampling between them, GAP and the head (module docstring)."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], step: str, num_classes: int = 1000,
                 unit: str = "u3", act: str = "gelu", layer_scale: float = 1e-6, drop_path: float = 0.0):
        super().__init__()
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
        bn = step not in ("convnext", "lc2pwconv")
        stem = nn.Conv2d(3, dims[0], 4, 4)
        self.stem = ConvBN.of(stem, nn.BatchNorm2d(dims[0])) if bn else \
            nn.Sequential(stem, LayerNorm2d(dims[0], eps=1e-6))
        n = sum(depths)
        rates = [drop_path * i / max(n - 1, 1) for i in range(n)]  # linear in depth, 0 to drop_path (ConvNeXt)
        self.downsample = nn.ModuleList(
            BNConv(dims[i], dims[i + 1]) if bn else
            nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, 2))
            for i in range(len(dims) - 1))
        self.stages = nn.ModuleList(
            nn.Sequential(*(NeXtBlock(dim, step, unit, act, layer_scale, rates[sum(depths[:i]) + j])
                            for j in range(depth)))
            for i, (depth, dim) in enumerate(zip(depths, dims)))
        self.head = BNLinear(dims[-1], num_classes) if bn else \
            nn.Sequential(nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes))
        self.out_channels = list(dims)
        for m in self.modules():  # ConvNeXt's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downsample[i - 1](x)
            x = stage(x)
        return self.head(x.mean((2, 3)))
