"""The re-parameterization algebra: pure functions on (kernel, bias) pairs.

Every block in :mod:`backbones` is merged with these functions and nothing else. A kernel has the layout of
``nn.Conv2d.weight``: ``(out_channels, in_channels // groups, kh, kw)``; a bias is ``(out_channels,)``.
Convolution is PyTorch's cross-correlation. The names follow DBB's "transforms" (I: fuse BN, II: add branches,
III: 1x1 -> kxk, IV: depth concatenation, V: average pooling, VI: multi-scale padding) plus the identity and the
kxk -> kxk composition used by OREPA's linear deep stem.
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
