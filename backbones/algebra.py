"""The re-parameterization algebra: pure functions on (kernel, bias) pairs.

Every block in :mod:`backbones` is merged with these functions and nothing else. A kernel has the layout of
``nn.Conv2d.weight``: ``(out_channels, in_channels // groups, kh, kw)``; a bias is ``(out_channels,)``.
Convolution is PyTorch's cross-correlation. The names follow DBB's "transforms" (I: fuse BN, II: add branches,
III: 1x1 -> kxk, IV: depth concatenation, V: average pooling, VI: multi-scale padding) plus the identity and the
kxk -> kxk composition used by OREPA's linear deep stem, a BN before a conv (RepNeXt's downsampling) and RepNeXt's
shortcut re-parameterization (Eq. 5-8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "fuse_conv_bn",
    "add_branches",
    "compose_sequential",
    "avg_pool_kernel",
    "pad_kernel",
    "identity_kernel",
    "concat_depth",
    "depthwise_pointwise_kernel",
    "fuse_bn_conv",
    "depthwise_with_identity",
    "pointwise_with_identity",
    "pointwise_add_identity",
]


def fuse_conv_bn(kernel: Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, conv_bias: Tensor | None = None):
    """Transform I: a conv (optionally with bias) followed by an eval-mode BatchNorm -> one conv with bias.

    ``K' = K * t`` and ``b' = beta + (c - mu) * t`` with ``t = gamma / sqrt(var + eps)`` per output channel.
    An affine-less BN counts as gamma = 1, beta = 0.
    """
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    t = gamma / std
    bias = -bn.running_mean if conv_bias is None else conv_bias - bn.running_mean
    return kernel * t.reshape(-1, 1, 1, 1), beta + bias * t


def add_branches(*pairs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Transform II: parallel branches of the same geometry sum kernel-wise and bias-wise."""
    kernels, biases = zip(*pairs)
    return torch.stack(kernels).sum(0), torch.stack(biases).sum(0)


def compose_sequential(first: Tensor, second: Tensor, groups: int = 1,
                       first_bias: Tensor | None = None, second_bias: Tensor | None = None):
    """Transforms III and the deep-stem rule: conv ``first`` followed by conv ``second`` -> one conv.

    ``first`` is (T, I/g, a, a), ``second`` is (O, T/g, b, b); the result is (O, I/g, a+b-1, a+b-1), the kernel
    convolution of OREPA's supplement Eq. (2). Exact for the composed conv when the intermediate map is not padded
    (b == 1, or the second conv is run unpadded on an input the first conv saw padded by the total), or when it is
    padded with the first conv's bias value (DBB's BNAndPad). Returns ``(kernel, bias)``; bias is ``None`` when
    neither conv has one.
    """
    t, i_per_group, a, _ = first.shape
    o, t_per_group, b, _ = second.shape
    if t != t_per_group * groups or o % groups:
        raise ValueError(f"cannot compose {tuple(first.shape)} -> {tuple(second.shape)} with groups={groups}")
    if a == 1:  # 1x1 -> kxk (Transform III): a plain contraction over the middle channels
        kernel = torch.einsum("gotx,gti->goix", second.reshape(groups, o // groups, t_per_group, b * b),
                              first.reshape(groups, t_per_group, i_per_group))
        kernel = kernel.reshape(o, i_per_group, b, b)
    else:
        kernel = _kernel_convolution(first, second, groups)
    if first_bias is None and second_bias is None:
        return kernel, None
    bias = torch.zeros(o, dtype=second.dtype, device=second.device) if second_bias is None else second_bias
    if first_bias is not None:
        summed = second.sum((2, 3)).reshape(groups, o // groups, t_per_group)
        bias = bias + torch.einsum("got,gt->go", summed, first_bias.reshape(groups, t_per_group)).reshape(o)
    return kernel, bias


def _kernel_convolution(first: Tensor, second: Tensor, groups: int) -> Tensor:
    t, i_per_group, a, _ = first.shape
    b = second.shape[-1]
    # Each group of `first` becomes a batch of I/g "images" with T/g channels; the flipped `second` slides over them.
    images = first.reshape(groups, t // groups, i_per_group, a, a).permute(2, 0, 1, 3, 4).reshape(i_per_group, t, a, a)
    return F.conv2d(images, second.flip(2, 3), padding=b - 1, groups=groups).transpose(0, 1).contiguous()


def avg_pool_kernel(channels: int, kernel_size: int, groups: int = 1, dtype=None, device=None) -> Tensor:
    """Transform V: ``AvgPool2d(k)`` on ``channels`` maps (count_include_pad) as a (channels, channels/g, k, k) kernel."""
    kernel = torch.zeros(channels, channels // groups, kernel_size, kernel_size, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % (channels // groups)] = 1.0 / kernel_size ** 2
    return kernel


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Transform VI: zero-pad a 1x1, 1xk or kx1 kernel (odd sides) to ``size`` x ``size``, centre-aligned."""
    kh, kw = kernel.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or kh > size or kw > size:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size}x{size}")
    ph, pw = (size - kh) // 2, (size - kw) // 2
    return F.pad(kernel, [pw, pw, ph, ph])


def identity_kernel(channels: int, kernel_size: int = 3, groups: int = 1, dtype=None, device=None) -> Tensor:
    """The identity map as a (channels, channels/g, k, k) kernel: 1 at the centre of (i, i mod channels/g)."""
    kernel = torch.zeros(channels, channels // groups, kernel_size, kernel_size, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % (channels // groups), kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


def concat_depth(*pairs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Transform IV: convs run side by side on the same input and concatenated along channels -> one conv."""
    kernels, biases = zip(*pairs)
    return torch.cat(kernels, 0), torch.cat(biases, 0)


def depthwise_pointwise_kernel(depthwise: Tensor, pointwise: Tensor, multiplier: int, groups: int = 1,
                               depthwise_bias: Tensor | None = None):
    """A depthwise kxk conv (C*m, 1, k, k; groups=C, channel multiplier m) followed by a grouped 1x1 (O, C*m/g, 1, 1)
    -> one (O, C/g, k, k) conv and the bias the depthwise bias contributes (``None`` without one).

    One contraction of O * C/g * m * k^2 multiply-adds instead of expanding the depthwise kernel to a dense one.
    """
    cm, _, kh, kw = depthwise.shape
    o = pointwise.shape[0]
    c_per_group = cm // multiplier // groups
    if pointwise.shape[1] != c_per_group * multiplier or o % groups:
        raise ValueError(f"cannot compose depthwise {tuple(depthwise.shape)} with pointwise {tuple(pointwise.shape)}")
    dw = depthwise.reshape(groups, c_per_group, multiplier, kh * kw)
    pw = pointwise.reshape(groups, o // groups, c_per_group, multiplier)
    kernel = torch.einsum("goit,gitx->goix", pw, dw).reshape(o, c_per_group, kh, kw)
    if depthwise_bias is None:
        return kernel, None
    bias = torch.einsum("goit,git->go", pw, depthwise_bias.reshape(groups, c_per_group, multiplier))
    return kernel, bias.reshape(o)


def fuse_bn_conv(bn: torch.nn.modules.batchnorm._BatchNorm, kernel: Tensor, bias: Tensor | None = None):
    """An eval-mode BatchNorm followed by an unpadded, ungrouped conv -> one conv (RepNeXt's downsampling: "the case
    where the BN layer is in front of the conv layer": the BN is a per-channel affine map, a 1x1 conv, composed with
    the conv). Exact only without zero padding (a padded border would see the BN's shift where the input is 0);
    the caller guarantees it."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    shift = bn.bias - bn.running_mean * scale
    fused = kernel * scale.reshape(1, -1, 1, 1)
    extra = (kernel * shift.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return fused, extra if bias is None else bias + extra


def depthwise_with_identity(kernel: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """RepNeXt's gw^rep (Eq. 6; Sec. 3.2 instruction 1): a depthwise (C, 1, k, k) conv becomes a (2C, 1, k, k) conv
    with groups=C whose group g outputs [the depthwise output of channel g, channel g itself] (a dirac kernel, Eq. 5,
    inserted after each depthwise kernel); the identity outputs carry no bias."""
    c, _, kh, kw = kernel.shape
    dirac = torch.zeros_like(kernel)
    dirac[:, :, kh // 2, kw // 2] = 1.0
    return (torch.stack((kernel, dirac), 1).reshape(2 * c, 1, kh, kw),
            torch.stack((bias, torch.zeros_like(bias)), 1).reshape(2 * c))


def pointwise_with_identity(kernel: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """RepNeXt's pw_1^rep (Eq. 7): a (H, C, 1, 1) pointwise conv reading :func:`depthwise_with_identity`'s
    interleaved 2C channels -> (H + C, 2C, 1, 1): the first H outputs are the pointwise conv of the depthwise outputs
    (zeros on the identity channels), the last C pass the identity channels through; no bias on those."""
    h, c = kernel.shape[:2]
    rep = kernel.new_zeros(h + c, c, 2)
    rep[:h, :, 0] = kernel.reshape(h, c)
    rep[h + torch.arange(c), torch.arange(c), 1] = 1.0
    return rep.reshape(h + c, 2 * c, 1, 1), torch.cat((bias, bias.new_zeros(c)))


def pointwise_add_identity(kernel: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """RepNeXt's pw_2^rep (Eq. 8): a (C, H, 1, 1) pointwise conv plus the shortcut -> (C, H + C, 1, 1) reading
    [the H hidden channels, the C shortcut channels] with a dirac block on the latter; the bias unchanged."""
    c = kernel.shape[0]
    identity = torch.eye(c, dtype=kernel.dtype, device=kernel.device).reshape(c, c, 1, 1)
    return torch.cat((kernel, identity), 1), bias
