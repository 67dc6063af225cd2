"""Memory-lean kernel compositions for OREPA's online squeeze (the training hot path).

``scaled_compose_1x1_kxk`` and ``scaled_depthwise_pointwise`` compute ``s[o] * (composed kernel)`` exactly like
``algebra.compose_sequential`` / ``algebra.depthwise_pointwise_kernel`` followed by a per-channel scale, but their
backward needs only the parameters: autograd would keep the scaled factor (a kernel-sized tensor) for every branch
and block until backward. The gradient of the scale is obtained from the contraction the factor's gradient needs
anyway (``grad_s[o] = sum(H * second)`` with ``H = g contracted with first``), so there is no recomputation either:
two contractions in backward, as autograd would do.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _Scaled1x1Kxk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, first: Tensor, second: Tensor, scale: Tensor, groups: int):
        t, ipg = first.shape[:2]
        o, tpg, kh, kw = second.shape
        f = first.reshape(groups, tpg, ipg)
        s2 = second.reshape(groups, o // groups, tpg, kh * kw)
        kernel = torch.einsum("gotx,gti->goix", s2, f) * scale.reshape(groups, o // groups, 1, 1)
        ctx.save_for_backward(first, second, scale)
        ctx.groups = groups
        return kernel.reshape(o, ipg, kh, kw)

    @staticmethod
    def backward(ctx, grad: Tensor):
        first, second, scale = ctx.saved_tensors
        groups = ctx.groups
        t, ipg = first.shape[:2]
        o, tpg, kh, kw = second.shape
        f = first.reshape(groups, tpg, ipg)
        s2 = second.reshape(groups, o // groups, tpg, kh * kw)
        g = grad.reshape(groups, o // groups, ipg, kh * kw)
        sc = scale.reshape(groups, o // groups, 1, 1)
        h = torch.einsum("goix,gti->gotx", g, f)                    # d kernel / d second, before the scale
        grad_second = (h * sc).reshape_as(second)
        grad_scale = (h * s2).sum((2, 3)).reshape_as(scale)
        grad_first = torch.einsum("goix,gotx->gti", g * sc, s2).reshape_as(first)
        return grad_first, grad_second, grad_scale, None


class _ScaledDepthwisePointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, depthwise: Tensor, pointwise: Tensor, scale: Tensor, multiplier: int, groups: int):
        cm, _, kh, kw = depthwise.shape
        o = pointwise.shape[0]
        cpg = cm // multiplier // groups
        dw = depthwise.reshape(groups, cpg, multiplier, kh * kw)
        pw = pointwise.reshape(groups, o // groups, cpg, multiplier)
        kernel = torch.einsum("goit,gitx->goix", pw, dw) * scale.reshape(groups, o // groups, 1, 1)
        ctx.save_for_backward(depthwise, pointwise, scale)
        ctx.multiplier, ctx.groups = multiplier, groups
        return kernel.reshape(o, cpg, kh, kw)

    @staticmethod
    def backward(ctx, grad: Tensor):
        depthwise, pointwise, scale = ctx.saved_tensors
        multiplier, groups = ctx.multiplier, ctx.groups
        cm, _, kh, kw = depthwise.shape
        o = pointwise.shape[0]
        cpg = cm // multiplier // groups
        dw = depthwise.reshape(groups, cpg, multiplier, kh * kw)
        pw = pointwise.reshape(groups, o // groups, cpg, multiplier)
        g = grad.reshape(groups, o // groups, cpg, kh * kw)
        sc = scale.reshape(groups, o // groups, 1, 1)
        h = torch.einsum("goix,gitx->goit", g, dw)                  # d kernel / d pointwise, before the scale
        grad_pointwise = (h * sc).reshape_as(pointwise)
        grad_scale = (h * pw).sum((2, 3)).reshape_as(scale)
        grad_depthwise = torch.einsum("goix,goit->gitx", g * sc, pw).reshape_as(depthwise)
        return grad_depthwise, grad_pointwise, grad_scale, None, None


def scaled_compose_1x1_kxk(first: Tensor, second: Tensor, scale: Tensor | None, groups: int = 1) -> Tensor:
    """``scale[o] * compose_sequential(first (T, I/g, 1, 1), second (O, T/g, k, k))`` with a parameter-only
    backward. ``scale``: (O,), (1,) or None."""
    o = second.shape[0]
    scale = second.new_ones(o) if scale is None else scale.reshape(-1).expand(o)
    return _Scaled1x1Kxk.apply(first, second, scale, groups)


def scaled_depthwise_pointwise(depthwise: Tensor, pointwise: Tensor, scale: Tensor | None, multiplier: int,
                               groups: int = 1) -> Tensor:
    """``scale[o] * depthwise_pointwise_kernel(depthwise, pointwise)`` with a parameter-only backward."""
    o = pointwise.shape[0]
    scale = pointwise.new_ones(o) if scale is None else scale.reshape(-1).expand(o)
    return _ScaledDepthwisePointwise.apply(depthwise, pointwise, scale, multiplier, groups)
