"""Each identity of the re-param algebra against the feature-map computation it replaces (property tests)."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from backbones import algebra
from conftest import randomize, rel_err

SETTINGS = settings(max_examples=25, deadline=None)
dims = st.integers(1, 4)


def x_for(channels, size=9, dtype=torch.float64):
    return torch.randn(2, channels, size, size, dtype=dtype)


@SETTINGS
@given(cin=dims, cout=dims, groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]), with_bias=st.booleans())
def test_fuse_conv_bn(cin, cout, groups, k, stride, with_bias):
    conv = nn.Conv2d(cin * groups, cout * groups, k, stride, k // 2, groups=groups, bias=with_bias).double()
    bn = randomize(nn.BatchNorm2d(cout * groups).double()).eval()
    x = x_for(cin * groups)
    kernel, bias = algebra.fuse_conv_bn(conv.weight, bn, conv.bias)
    expected = bn(conv(x))
    assert rel_err(F.conv2d(x, kernel, bias, stride, k // 2, groups=groups), expected) < 1e-12


@SETTINGS
@given(n=st.integers(1, 4), cin=dims, cout=dims)
def test_add_branches(n, cin, cout):
    pairs = [(torch.randn(cout, cin, 3, 3, dtype=torch.float64), torch.randn(cout, dtype=torch.float64))
             for _ in range(n)]
    x = x_for(cin)
    kernel, bias = algebra.add_branches(*pairs)
    expected = sum(F.conv2d(x, k, b, padding=1) for k, b in pairs)
    assert rel_err(F.conv2d(x, kernel, bias, padding=1), expected) < 1e-12


@SETTINGS
@given(cin=dims, mid=dims, cout=dims, groups=st.sampled_from([1, 2, 3]), k=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]))
def test_compose_1x1_then_kxk(cin, mid, cout, groups, k, stride):
    """Transform III, grouped too; with biases and the intermediate map padded by the 1x1's bias (DBB's BNAndPad)."""
    first = torch.randn(mid * groups, cin, 1, 1, dtype=torch.float64)
    b1 = torch.randn(mid * groups, dtype=torch.float64)
    second = torch.randn(cout * groups, mid, k, k, dtype=torch.float64)
    b2 = torch.randn(cout * groups, dtype=torch.float64)
    x = x_for(cin * groups)
    y = F.conv2d(x, first, b1, groups=groups)
    v = b1.reshape(1, -1, 1, 1)
    y = F.pad(y - v, [k // 2] * 4) + v
    expected = F.conv2d(y, second, b2, stride, groups=groups)
    kernel, bias = algebra.compose_sequential(first, second, groups, b1, b2)
    assert kernel.shape == (cout * groups, cin, k, k)
    assert rel_err(F.conv2d(x, kernel, bias, stride, k // 2, groups=groups), expected) < 1e-12


@SETTINGS
@given(cin=dims, mid=dims, cout=dims, a=st.sampled_from([1, 3, 5]), b=st.sampled_from([3, 5]),
       stride=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]))
def test_compose_kxk_then_kxk(cin, mid, cout, a, b, stride, groups):
    """The deep-stem rule: two unpadded convs == one conv of size a+b-1 (grouped and with biases too)."""
    first = torch.randn(mid * groups, cin, a, a, dtype=torch.float64)
    b1 = torch.randn(mid * groups, dtype=torch.float64)
    second = torch.randn(cout * groups, mid, b, b, dtype=torch.float64)
    b2 = torch.randn(cout * groups, dtype=torch.float64)
    x = x_for(cin * groups, 13)
    expected = F.conv2d(F.conv2d(x, first, b1, groups=groups), second, b2, stride, groups=groups)
    kernel, bias = algebra.compose_sequential(first, second, groups, b1, b2)
    assert kernel.shape[-1] == a + b - 1
    assert rel_err(F.conv2d(x, kernel, bias, stride, groups=groups), expected) < 1e-12


def test_compose_three_3x3_is_the_padded_7x7_only_when_padded_once():
    ks = [torch.randn(4, 3, 3, 3, dtype=torch.float64)] + [torch.randn(4, 4, 3, 3, dtype=torch.float64)
                                                          for _ in range(2)]
    kernel = ks[0]
    for k in ks[1:]:
        kernel, _ = algebra.compose_sequential(kernel, k)
    x = x_for(3, 12)
    y = F.pad(x, [3] * 4)
    for k in ks:
        y = F.conv2d(y, k)
    assert rel_err(F.conv2d(x, kernel, padding=3), y) < 1e-12
    padded_each = x
    for k in ks:
        padded_each = F.conv2d(padded_each, k, padding=1)
    assert rel_err(F.conv2d(x, kernel, padding=3), padded_each) > 1e-3  # the borders differ (OREPA issue #9)


@SETTINGS
@given(c=dims, groups=st.sampled_from([1, 2]), k=st.sampled_from([2, 3, 5]), stride=st.sampled_from([1, 2]))
def test_avg_pool_kernel(c, groups, k, stride):
    channels = c * groups
    x = x_for(channels)
    expected = F.avg_pool2d(x, k, stride, k // 2, count_include_pad=True)
    kernel = algebra.avg_pool_kernel(channels, k, groups, dtype=torch.float64)
    assert rel_err(F.conv2d(x, kernel, None, stride, k // 2, groups=groups), expected) < 1e-12


@SETTINGS
@given(cin=dims, cout=dims, size=st.sampled_from([3, 5, 7]), shape=st.sampled_from(["1x1", "1xk", "kx1"]),
       stride=st.sampled_from([1, 2]))
def test_pad_kernel(cin, cout, size, shape, stride):
    kh, kw = {"1x1": (1, 1), "1xk": (1, size), "kx1": (size, 1)}[shape]
    small = torch.randn(cout, cin, kh, kw, dtype=torch.float64)
    x = x_for(cin)
    p = size // 2
    expected = F.conv2d(x, small, None, stride, (p - (size - kh) // 2, p - (size - kw) // 2))
    assert rel_err(F.conv2d(x, algebra.pad_kernel(small, size), None, stride, p), expected) < 1e-12


@SETTINGS
@given(c=dims, groups=st.sampled_from([1, 2, 4]), k=st.sampled_from([1, 3, 5]))
def test_identity_kernel(c, groups, k):
    x = x_for(c * groups)
    kernel = algebra.identity_kernel(c * groups, k, groups, dtype=torch.float64)
    assert torch.equal(F.conv2d(x, kernel, None, 1, k // 2, groups=groups), x)


@SETTINGS
@given(cin=dims, outs=st.lists(dims, min_size=1, max_size=4))
def test_concat_depth(cin, outs):
    pairs = [(torch.randn(o, cin, 3, 3, dtype=torch.float64), torch.randn(o, dtype=torch.float64)) for o in outs]
    x = x_for(cin)
    kernel, bias = algebra.concat_depth(*pairs)
    expected = torch.cat([F.conv2d(x, k, b, padding=1) for k, b in pairs], 1)
    assert rel_err(F.conv2d(x, kernel, bias, padding=1), expected) < 1e-12


@SETTINGS
@given(c=dims, cout=dims, multiplier=st.sampled_from([1, 2, 8]), groups=st.sampled_from([1, 2]),
       stride=st.sampled_from([1, 2]), with_bias=st.booleans())
def test_depthwise_pointwise_kernel(c, cout, multiplier, groups, stride, with_bias):
    channels = c * groups
    dw = torch.randn(channels * multiplier, 1, 3, 3, dtype=torch.float64)
    dw_bias = torch.randn(channels * multiplier, dtype=torch.float64) if with_bias else None
    pw = torch.randn(cout * groups, channels * multiplier // groups, 1, 1, dtype=torch.float64)
    x = x_for(channels)
    expected = F.conv2d(F.conv2d(x, dw, dw_bias, stride, 1, groups=channels), pw, groups=groups)
    kernel, bias = algebra.depthwise_pointwise_kernel(dw, pw, multiplier, groups, dw_bias)
    assert rel_err(F.conv2d(x, kernel, bias, stride, 1, groups=groups), expected) < 1e-12


def test_compose_rejects_mismatched_shapes():
    import pytest
    with pytest.raises(ValueError):
        algebra.compose_sequential(torch.randn(4, 3, 1, 1), torch.randn(5, 3, 3, 3))


@SETTINGS
@given(cin=dims, mid=dims, cout=dims, groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 3]),
       scaling=st.sampled_from(["vector", "scalar", "none"]))
def test_lean_scaled_compose_matches_algebra_and_gradcheck(cin, mid, cout, groups, k, scaling):
    from backbones import lean
    first = torch.randn(mid * groups, cin, 1, 1, dtype=torch.float64, requires_grad=True)
    second = torch.randn(cout * groups, mid, k, k, dtype=torch.float64, requires_grad=True)
    scale = {"vector": torch.rand(cout * groups, dtype=torch.float64, requires_grad=True),
             "scalar": torch.rand(1, dtype=torch.float64, requires_grad=True), "none": None}[scaling]
    expected = algebra.compose_sequential(first, second, groups)[0] * (1 if scale is None else
                                                                      scale.reshape(-1, 1, 1, 1))
    assert rel_err(lean.scaled_compose_1x1_kxk(first, second, scale, groups), expected) < 1e-12
    inputs = (first, second) + (() if scale is None else (scale,))
    assert torch.autograd.gradcheck(lambda *a: lean.scaled_compose_1x1_kxk(a[0], a[1], a[2] if len(a) > 2 else None,
                                                                           groups), inputs)


@SETTINGS
@given(c=dims, cout=dims, multiplier=st.sampled_from([1, 2, 8]), groups=st.sampled_from([1, 2]),
       scaling=st.sampled_from(["vector", "scalar"]))
def test_lean_scaled_depthwise_pointwise_matches_algebra_and_gradcheck(c, cout, multiplier, groups, scaling):
    from backbones import lean
    channels = c * groups
    dw = torch.randn(channels * multiplier, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    pw = torch.randn(cout * groups, channels * multiplier // groups, 1, 1, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(cout * groups if scaling == "vector" else 1, dtype=torch.float64, requires_grad=True)
    expected = algebra.depthwise_pointwise_kernel(dw, pw, multiplier, groups)[0] * scale.reshape(-1, 1, 1, 1)
    assert rel_err(lean.scaled_depthwise_pointwise(dw, pw, scale, multiplier, groups), expected) < 1e-12
    assert torch.autograd.gradcheck(lambda *a: lean.scaled_depthwise_pointwise(*a, multiplier, groups), (dw, pw, scale))
