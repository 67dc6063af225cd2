"""Every block and variant: training form == deployed form (eval mode, randomised BN statistics), and the online
OREPA forms == their branch-by-branch linear oracle with the same parameters."""

import copy

import pytest
import torch

from backbones import deploy
from backbones.blocks import (ACB, DBB, OREPA, OREPA_BRANCHES, OREPA1x1, ConvBN, MultiBranchConv, OREPADeepStem,
                              RepVGGBlock, orepa_vgg_block)
from backbones.branches import ConvGeometry
from backbones.repopt import CSLA, RepOptConvBN
from conftest import TOLERANCE, randomize, rel_err

BLOCKS = {
    "convbn": lambda g: ConvBN(g),
    "acb": lambda g: ACB(g),
    "dbb": lambda g: DBB(g),
    "dbb_no_branch_norm": lambda g: DBB(g, form="linear_offline", scaling="none", post_norm=True),
    "repvgg": lambda g: RepVGGBlock(g),
    "repvgg_no_branch_norm": lambda g: RepVGGBlock(g, "linear_offline", "none", True),
    "repvgg_online": lambda g: RepVGGBlock(g, "online", "vector", True),
    "orepa": lambda g: OREPA(g),
    "orepa_scalar": lambda g: OREPA(g, scaling="scalar"),
    "orepa_no_scaling": lambda g: OREPA(g, scaling="none"),
    "orepa_no_post_norm": lambda g: OREPA(g, post_norm=False),
    "orepa_paper_init": lambda g: OREPA(g, init="paper"),
    "orepa_offline_bn": lambda g: OREPA(g, form="offline_bn"),
    "orepa_linear_offline": lambda g: OREPA(g, form="linear_offline"),
    "orepa_dbb_branches": lambda g: OREPA(g, branches=("origin", "1x1", "avg", "1x1_kxk")),
    "orepa_vgg": lambda g: orepa_vgg_block(g),
    "orepa_vgg_offline": lambda g: orepa_vgg_block(g, "offline_bn"),
    "csla": lambda g: CSLA(g),                    # RepOptimizers: constant scales (randomised, negatives too)
    "hs": lambda g: CSLA(g, trainable=True),      # RepOptimizers: Hyper-Search
    "repopt": lambda g: RepOptConvBN(g),
}
NO_GROUPS = {"dbb", "dbb_no_branch_norm"}  # grouped DBB is allowed; kept in the grid below via groups=2 too


def check_deploy(block, x, dtype):
    block = randomize(block.to(dtype)).eval()
    x = x.to(dtype)
    with torch.no_grad():
        expected = block(x)
        conv = deploy(block)
        got = conv(x)
    assert isinstance(conv, torch.nn.Conv2d)
    assert got.shape == expected.shape
    err = rel_err(got, expected)
    assert err <= TOLERANCE[dtype], err


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
def test_block_train_equals_deploy(name, stride, groups, dtype):
    torch.manual_seed(0)
    block = BLOCKS[name](ConvGeometry(8, 8, 3, stride, groups=groups))
    check_deploy(block, torch.randn(2, 8, 11, 11), dtype)


@pytest.mark.parametrize("name", ["acb", "dbb", "orepa", "orepa_offline_bn", "orepa_vgg"])
@pytest.mark.parametrize("k", [5])
def test_larger_kernels_and_channel_change(name, k, dtype):
    torch.manual_seed(1)
    block = BLOCKS[name](ConvGeometry(6, 10, k, 2))
    check_deploy(block, torch.randn(2, 6, 13, 13), dtype)


@pytest.mark.parametrize("name", ["dbb", "orepa", "orepa_offline_bn", "acb", "orepa_linear_offline"])
def test_dilated_blocks(name, dtype):
    """DBB/OREPA with dilation (mmseg D8 backbones): every branch applied with the dilation (ours, recorded)."""
    torch.manual_seed(2)
    block = BLOCKS[name](ConvGeometry(8, 8, 3, 1, dilation=2))
    check_deploy(block, torch.randn(2, 8, 12, 12), dtype)


@pytest.mark.parametrize("form", ["offline_bn", "linear_offline"])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
def test_depthwise_dbb(form, stride, dilation, dtype):
    """DBB's MobileNet block (groups == in == out): no 1x1 branch, average pooling without a 1x1 before it, a
    1x1-kxk branch through 2C channels; exact deploy to one depthwise conv."""
    torch.manual_seed(4)
    block = DBB(ConvGeometry(6, 6, 3, stride, dilation=dilation, groups=6), form, post_norm=form != "offline_bn")
    assert list(block.branches) == ["origin", "avg_only", "1x1_kxk"]
    assert block.branches["1x1_kxk"].first.shape == (12, 1, 1, 1)
    assert not list(block.branches["avg_only"].parameters())
    check_deploy(block, torch.randn(2, 6, 13, 13), dtype)
    with pytest.raises(ValueError, match="depthwise"):
        DBB(ConvGeometry(8, 4, 3, groups=4))


def test_grouped_orepa_uses_double_internal_channels(dtype):
    torch.manual_seed(3)
    block = OREPA(ConvGeometry(32, 32, 3, 1, groups=8))
    assert block.branches["1x1_kxk"].internal == 64
    check_deploy(block, torch.randn(2, 32, 7, 7), dtype)


@pytest.mark.parametrize("cin,cout", [(16, 64), (64, 16), (32, 32)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("form", ["online", "offline_bn"])
def test_rep_1x1(cin, cout, stride, form, dtype):
    torch.manual_seed(4)
    block = OREPA1x1(ConvGeometry(cin, cout, 1, stride, 0), form)
    check_deploy(block, torch.randn(2, cin, 9, 9), dtype)


@pytest.mark.parametrize("form", ["online", "linear_offline", "offline_bn"])
def test_deep_stem(form, dtype):
    torch.manual_seed(5)
    check_deploy(OREPADeepStem(3, 16, 2, form), torch.randn(2, 3, 20, 20), dtype)


def as_oracle(module):
    """The same parameters, every branch run on the feature map (no BN until the post-norm)."""
    oracle = copy.deepcopy(module)
    for m in oracle.modules():
        if isinstance(m, (MultiBranchConv, OREPADeepStem)) and m.form == "online":
            m.form = "linear_offline"
    return oracle


@pytest.mark.parametrize("branches", [OREPA_BRANCHES, ("origin", "1x1", "avg", "1x1_kxk"), ("prior",), ("dw_pw",)])
@pytest.mark.parametrize("scaling", ["vector", "scalar", "none"])
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_online_orepa_equals_linear_oracle(branches, scaling, stride, groups, dtype):
    torch.manual_seed(6)
    block = randomize(OREPA(ConvGeometry(8, 16, 3, stride, groups=groups), branches, scaling=scaling).to(dtype))
    block.eval()
    x = torch.randn(2, 8, 10, 10, dtype=dtype)
    with torch.no_grad():
        assert rel_err(block(x), as_oracle(block)(x)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("block", ["repvgg_online", "rep_1x1", "orepa_vgg"])
def test_other_online_blocks_equal_their_oracle(block, dtype):
    torch.manual_seed(7)
    module = {"repvgg_online": lambda: RepVGGBlock(ConvGeometry(8, 8, 3), "online", "vector", True),
              "rep_1x1": lambda: OREPA1x1(ConvGeometry(8, 24, 1, 1, 0)),
              "orepa_vgg": lambda: orepa_vgg_block(ConvGeometry(8, 8, 3))}[block]()
    module = randomize(module.to(dtype)).eval()
    x = torch.randn(2, 8, 9, 9, dtype=dtype)
    with torch.no_grad():
        assert rel_err(module(x), as_oracle(module)(x)) <= TOLERANCE[dtype]


def test_deep_stem_equals_three_unpadded_convs(dtype):
    """The oracle of the linear deep stem: pad by 3, then three unpadded 3x3 OREPA convs (the last with stride 2)."""
    torch.manual_seed(8)
    stem = randomize(OREPADeepStem(3, 16).to(dtype)).eval()
    x = torch.randn(2, 3, 23, 23, dtype=dtype)
    with torch.no_grad():
        y = torch.nn.functional.pad(x, [3] * 4)
        for layer in stem.layers:
            y = as_oracle(layer)(y)
        expected = stem.post_bn(y)
        assert rel_err(stem(x), expected) <= TOLERANCE[dtype]


def test_online_gradients_match_oracle():
    """Training dynamics, not only outputs: the online squeeze and the oracle give the same parameter gradients."""
    torch.manual_seed(9)
    block = randomize(OREPA(ConvGeometry(6, 6, 3)).double()).train()
    oracle = as_oracle(block)
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64)
    block(x).square().sum().backward()
    oracle(x).square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), oracle.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-8, name  # train-mode BN gradients cancel: small, noisier


def test_identity_branch_needs_matching_shapes():
    with pytest.raises(ValueError):
        MultiBranchConv(ConvGeometry(8, 16, 3), ("identity",), "offline_bn", post_norm=False)
    assert "identity" not in RepVGGBlock(ConvGeometry(8, 8, 3, 2)).branches


@pytest.mark.parametrize("kwargs", [dict(form="sideways"), dict(scaling="matrix"), dict(init="random"),
                                    dict(branches=("origin", "origin")), dict(branches=("fft",))])
def test_bad_block_config_is_a_clear_error(kwargs):
    with pytest.raises(ValueError):
        OREPA(ConvGeometry(8, 8, 3), **kwargs)


def test_deploy_is_idempotent_and_keeps_mode():
    block = randomize(DBB(ConvGeometry(4, 4, 3)))
    model = torch.nn.Sequential(block, torch.nn.ReLU()).eval()
    deploy(model)
    first = copy.deepcopy(model.state_dict())
    deploy(model)
    assert not model[0].training
    assert first.keys() == model.state_dict().keys()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
