"""DyRep's Rep and Dep (backbones/dyrep.py): growing a conv into a multi-branch block and cutting branches leave the
eval-mode function unchanged at the moment they happen (float64 <= 1e-9, float32 within the suite's tolerance),
nested growth included, for shapes that vary channels, groups, stride and dilation; a network that grew and was cut
deploys to exactly the plain architecture."""

import pytest
import torch
from torch import nn

from backbones import build_classifier, deploy
from backbones.blocks import ConvBN, MultiBranchConv
from backbones.branches import ConvGeometry
from backbones.dyrep import (GAMMA, OPS, Grown, allowed_ops, branch_importance, collapse, cut, grow, sites)
from conftest import TOLERANCE, randomize, rel_err

GEOMETRIES = [  # in, out, k, stride, padding, dilation, groups
    ConvGeometry(8, 8, 3), ConvGeometry(8, 16, 3, 2), ConvGeometry(8, 8, 3, 1, None, 2),
    ConvGeometry(8, 8, 3, 1, None, 1, 4), ConvGeometry(6, 12, 5, 1, None, 1, 3), ConvGeometry(8, 8, 3, 1, 0)]
IDS = ["3x3", "stride2-wider", "dilation2", "groups4", "5x5-groups3", "padding0"]


def _host(geometry: ConvGeometry, dtype) -> ConvBN:
    torch.manual_seed(0)
    return randomize(ConvBN(geometry)).to(dtype).eval()


def _perturb(module: nn.Module, seed: int) -> None:
    """What training does to a grown block: every parameter and BN statistic moved away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        randomize(module, seed)


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _recalibrate(x):
    """The official code's BN recalibration, on a batch: train-mode forwards that reset the new BNs' statistics."""
    def recal(block):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        block.train()
        with torch.no_grad():
            block(x)
        block.eval()
    return recal


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_grow_keeps_the_function(geometry, dtype):
    """Rep (Eq. 6): the conv becomes every op its geometry allows, new branches' last BN gamma 0.01, BN statistics
    recalibrated from a batch, and the block's eval-mode output is what the conv gave."""
    host = _host(geometry, dtype)
    x = torch.randn(2, geometry.in_channels, 9, 9, dtype=dtype)
    before = _out(host, x)
    block = grow(host, "conv", generator=torch.Generator().manual_seed(1), recalibrate=_recalibrate(x))
    assert host.conv is block and isinstance(block, MultiBranchConv)
    assert tuple(block.branches) == allowed_ops(geometry)
    assert all(float(block.norms[n].weight.mean()) == pytest.approx(GAMMA) for n in block.branches if n != "origin")
    assert rel_err(_out(host, x), before) <= TOLERANCE[dtype]
    deploy_err = rel_err(_out(deploy(host), x), before)
    assert deploy_err <= TOLERANCE[dtype], deploy_err


def test_allowed_ops_follow_the_geometry():
    assert allowed_ops(ConvGeometry(8, 8, 3)) == OPS
    assert "identity" not in allowed_ops(ConvGeometry(8, 8, 3, 2))
    assert allowed_ops(ConvGeometry(8, 8, 3, 1, 0)) == ("origin", "1x1_kxk", "avg")  # not "same" padding
    with pytest.raises(ValueError, match="keeps its kxk"):
        allowed_ops(ConvGeometry(8, 8, 3), ("1x1", "avg"))


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=IDS[:4])
def test_nested_growth_and_cuts_keep_the_function_and_deploy_to_the_plain_conv(geometry, dtype):
    """Grow, train (perturb), grow the grown block's origin (nested Rep), train, cut two outer and one inner branch
    (Dep, Eq. 10), cut the rest and collapse to a plain conv: the eval-mode output never moves, and the deployed
    host is one conv of the original shape."""
    host = _host(geometry, dtype)
    x = torch.randn(2, geometry.in_channels, 9, 9, dtype=dtype)
    outer = grow(host, "conv", generator=torch.Generator().manual_seed(1))
    _perturb(host, 2)
    reference = _out(host, x)
    inner = grow(outer.branches, "origin", ops=("origin", "1x1", "1x1_kxk"), generator=torch.Generator().manual_seed(3))
    assert isinstance(outer.branches["origin"], Grown) and outer.branches["origin"].block is inner
    assert rel_err(_out(host, x), reference) <= TOLERANCE[dtype]
    _perturb(host, 4)
    reference = _out(host, x)
    cut(outer, [n for n in outer.branches if n not in ("origin", "1x1_kxk")][:2])
    cut(inner, ["1x1"])
    assert rel_err(_out(host, x), reference) <= TOLERANCE[dtype]
    cut(outer, [n for n in outer.branches if n != "origin"])
    cut(inner, [n for n in inner.branches if n != "origin"])
    assert rel_err(_out(host, x), reference) <= TOLERANCE[dtype]
    collapse(host)
    assert type(host.conv) is nn.Conv2d and host.conv.bias is not None
    assert rel_err(_out(host, x), reference) <= TOLERANCE[dtype]
    deployed = deploy(host)
    assert type(deployed) is nn.Conv2d and deployed.weight.shape == (geometry.out_channels,
                                                                     geometry.in_channels // geometry.groups,
                                                                     geometry.kernel_size, geometry.kernel_size)
    assert rel_err(_out(deployed, x), reference) <= TOLERANCE[dtype]


def test_a_network_that_grew_and_was_cut_deploys_to_the_plain_architecture(dtype):
    """ResNet-18: three convs grow (one of them twice, nested), training moves everything, one block loses branches;
    the whole network's eval output is unchanged by each step and the deployed network has exactly the plain
    ResNet-18's parameter count."""
    torch.manual_seed(0)
    model = randomize(build_classifier("resnet18", "none", 10)).to(dtype).eval()
    plain = sum(p.numel() for p in deploy(build_classifier("resnet18", "none", 10)).parameters())
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    names = [n for n in sites(model) if n.startswith(("layer", "stage"))][:3] or list(sites(model))[:3]
    assert len(names) == 3 and all(n.endswith(".conv") for n in names)
    blocks = []
    for i, name in enumerate(names):
        reference = _out(model, x)
        parent, attr = sites(model)[name]
        blocks.append(grow(parent, attr, generator=torch.Generator().manual_seed(i)))
        assert rel_err(_out(model, x), reference) <= TOLERANCE[dtype], name
        _perturb(blocks[-1], 10 + i)
    nested = f"{names[0]}.branches.origin"
    assert nested in sites(model)  # a grown block's kxk branch is a site too
    reference = _out(model, x)
    grow(*sites(model)[nested], ops=("origin", "1x1"), generator=torch.Generator().manual_seed(7))
    assert rel_err(_out(model, x), reference) <= TOLERANCE[dtype]
    weights = branch_importance(blocks[1])
    assert weights["origin"] == 1.0 and set(weights) == set(blocks[1].branches)
    reference = _out(model, x)
    cut(blocks[1], sorted(n for n in weights if n != "origin")[:2])
    assert rel_err(_out(model, x), reference) <= TOLERANCE[dtype]
    grown_params = sum(p.numel() for p in model.parameters())
    deploy(model)
    assert sum(p.numel() for p in model.parameters()) == plain < grown_params
    assert rel_err(_out(model, x), reference) <= TOLERANCE[dtype]


def test_cut_refuses_the_origin_and_unknown_branches():
    host = _host(ConvGeometry(8, 8, 3), torch.float64)
    block = grow(host, "conv")
    with pytest.raises(ValueError, match="never cut"):
        cut(block, ["origin"])
    with pytest.raises(ValueError, match="no branches"):
        cut(block, ["dw_pw"])
    with pytest.raises(ValueError, match="grown already"):
        grow(host, "conv")
    with pytest.raises(ValueError, match="origin alone"):
        collapse(host)
