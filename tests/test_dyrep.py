"""DyRep's Rep and Dep (backbones/dyrep.py): growing a conv into a multi-branch block and cutting branches leave the
eval-mode function unchanged at the moment they happen (float64 <= 1e-9, float32 within the suite's tolerance),
nested growth included, for shapes that vary channels, groups, stride and dilation; a network that grew and was cut
deploys to exactly the plain architecture."""

from pathlib import Path

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
    ConvGeometry(8, 8, 3, 1, None, 1, 4), ConvGeometry(6, 12, 5, 1, None, 1, 3), ConvGeometry(8, 8, 3, 1, 0),
    ConvGeometry(8, 8, 3, 2, None, 1, 8)]
IDS = ["3x3", "stride2-wider", "dilation2", "groups4", "5x5-groups3", "padding0", "depthwise-stride2"]


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


def test_a_grown_runs_weights_load_into_the_plain_network_through_its_events(tmp_path):
    """The final train-form weights of a grown run carry its events: load_checkpoint grows a fresh plain network the
    same way, then loads strictly (the same function); events that do not fit the model are a CheckpointError."""
    from dataclasses import asdict
    from backbones import load_checkpoint, save_checkpoint
    from backbones.deploy import CheckpointError
    from runners.dyrep import DyRep
    torch.manual_seed(0)
    net = randomize(build_classifier("vgg16_cifar", "dyrep", 4)).double()
    dyrep = DyRep(net)
    dyrep.saliency.counts = {"features.2.conv": 1, "features.5.conv": 1}
    dyrep.saliency.sums = {"synflow": {"features.2.conv": 2.0, "features.5.conv": 1.0}}
    dyrep.adjust(0)
    cut(net.get_submodule("features.2.conv"), ["hor", "avg"])
    dyrep.events.append(dyrep.events[0].__class__(0, "cut", "features.2.conv", ["hor", "avg"]))
    _perturb(net, 1)
    path = save_checkpoint(net, tmp_path / "w.pth", events=[asdict(e) for e in dyrep.events])
    fresh = build_classifier("vgg16_cifar", "dyrep", 4).double()
    meta = load_checkpoint(fresh, path)
    assert [e["kind"] for e in meta["meta"]["events"]] == ["grow", "cut"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert rel_err(_out(fresh, x), _out(net, x)) <= 1e-12
    events = [asdict(e) for e in dyrep.events]
    events[0]["site"] = "features.9.conv"  # no such conv
    path = save_checkpoint(net, tmp_path / "w.pth", events=events)
    with pytest.raises(CheckpointError, match="do not apply"):
        load_checkpoint(build_classifier("vgg16_cifar", "dyrep", 4).double(), path)


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


# -- the controller (runners/dyrep.py) -------------------------------------------------------------------------------

def _two_site_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(ConvBN(ConvGeometry(3, 8, 3)), nn.ReLU(), ConvBN(ConvGeometry(8, 8, 3)), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return randomize(net).to(dtype)


@pytest.mark.parametrize("metric", ["synflow", "snip", "grad_norm"])
def test_saliency_is_computed_from_the_gradients_the_step_uses(metric):
    """Gradients set by hand (as accumulation and DDP's all-reduce leave them), two optimizer steps: each site's
    score is the metric of the gradient and of the weight as the step found them (before the update), averaged."""
    from runners.dyrep import Saliency
    net = _two_site_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    saliency = Saliency(net, metric).attach(optimizer)
    expected = {"0.conv": [], "2.conv": []}
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        for name in expected:
            w = net.get_submodule(name).weight
            expected[name].append({"synflow": (w.grad * w).sum(), "snip": (w.grad * w).abs().sum(),
                                   "grad_norm": w.grad.norm()}[metric].item())
        optimizer.step()
    averages = saliency.averages()
    for name, values in expected.items():
        assert averages[name] == pytest.approx(sum(values) / 2, rel=1e-12)
    assert saliency.counts == {"0.conv": 2, "2.conv": 2}
    saliency.detach()
    optimizer.step()
    assert saliency.counts == {"0.conv": 2, "2.conv": 2}


def test_grasp_is_minus_the_weight_times_the_hessian_applied_to_the_steps_gradient():
    """grasp (Eq. 14): -sum(w * H g) with g the gradient the step uses (set by hand: any vector) and H the loss's
    Hessian on the step's batch. The reference H g is a central finite difference of gradients (an independent
    route); the extra forward leaves BN statistics and the step's gradients as they were."""
    import copy
    from runners.dyrep import Saliency
    net = _two_site_net()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    net.train()
    g = torch.Generator().manual_seed(6)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    held = {p: p.grad.clone() for p in net.parameters()}
    names = ["0.conv", "2.conv"]

    def gradients_at(shift: float) -> list[torch.Tensor]:
        probe = copy.deepcopy(net)
        with torch.no_grad():
            for p, q in zip(net.parameters(), probe.parameters()):
                q.add_(shift * held[p])
        loss = probe(x).square().mean()
        return torch.autograd.grad(loss, [probe.get_submodule(n).weight for n in names])

    eps = 1e-6  # truncation ~ eps^2 |g|^3, rounding ~ 1e-16 / eps: both far below the tolerance
    plus, minus = gradients_at(eps), gradients_at(-eps)
    expected = {n: -float((net.get_submodule(n).weight * (a - b) / (2 * eps)).sum())
                for n, a, b in zip(names, plus, minus)}
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    saliency = Saliency(net, "grasp", loss_fn=lambda: net(x).square().mean())
    saliency.record()
    for name in names:
        assert saliency.averages()[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())
    assert all(torch.equal(p.grad, held[p]) for p in net.parameters())
    with pytest.raises(ValueError, match="loss_fn"):
        Saliency(net, "grasp").record()


def test_vote_grows_the_site_most_metrics_put_first_ties_to_synflow():
    from runners.dyrep import Saliency
    saliency = Saliency(_two_site_net(), "vote")
    saliency.counts = {"a": 1, "b": 1, "c": 1}
    saliency.sums = {"synflow": {"a": 3.0, "b": 1.0, "c": 0.0}, "snip": {"a": 0.0, "b": 2.0, "c": 1.0},
                     "grasp": {"a": 0.0, "b": 5.0, "c": 1.0}}
    assert saliency.averages() == {"a": 1.0, "b": 2.0, "c": 0.0}
    assert saliency.ranked({"a", "b", "c"}) == ["b", "a", "c"]
    saliency.sums["grasp"] = {"a": 0.0, "b": 0.0, "c": 9.0}  # one vote each: synflow's order decides
    assert saliency.ranked({"a", "b", "c"}) == ["a", "b", "c"]
    assert saliency.ranked({"b", "c"}) == ["b", "c"]


def test_dyrep_grows_inside_repvgg_blocks_and_deploys_to_repvgg():
    """DyRep Table 4's hosts: the 3x3 branch of every RepVGG training block is a site (its 1x1 and identity branches
    stay); growing it, nested growth and cuts keep the network's function, and the deployed network is exactly
    the deployed RepVGG's (parameter count and output)."""
    torch.manual_seed(0)
    model = randomize(build_classifier("repvgg_a0", "repvgg", 10)).double().eval()
    plain = sum(p.numel() for p in deploy(build_classifier("repvgg_a0", "repvgg", 10)).parameters())
    found = sites(model)
    assert "stem.branches.origin" in found and "stage1.0.branches.origin" in found and len(found) == 22
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference = _out(model, x)
    block = grow(*found["stage3.2.branches.origin"], generator=torch.Generator().manual_seed(1))
    host = model.get_submodule("stage3.2")
    assert isinstance(host.branches["origin"], Grown) and {"1x1", "identity"} <= set(host.branches)
    assert rel_err(_out(model, x), reference) <= TOLERANCE[torch.float64]
    _perturb(block, 2)
    grow(*sites(model)["stage3.2.branches.origin.block.branches.origin"], ops=("origin", "1x1"))
    cut(block, ["avg", "hor"])
    reference = _out(model, x)
    deploy(model)
    assert sum(p.numel() for p in model.parameters()) == plain
    assert rel_err(_out(model, x), reference) <= TOLERANCE[torch.float64]


def test_mobilenet_v1_counts_and_its_depthwise_sites(dtype):
    """MobileNetV1 (DyRep Table 3's host): 4,231,976 parameters and the MACs of its definition at 224x224; its 14
    kxk sites are the stem and the 13 depthwise convs; a grown depthwise conv deploys back to the plain network."""
    from runners.probes import _on_meta, count_macs
    model = build_classifier("mobilenet_v1", "dyrep")
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    size, c, macs = 112, 32, 112 * 112 * 32 * 27
    for out, stride in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2),
                        (1024, 1)):
        size //= stride
        macs += size * size * c * 9 + size * size * c * out
        c = out
    assert count_macs(_on_meta(model.eval()), 224) == macs + 1024 * 1000
    found = sites(model)
    assert len(found) == 14 and found["features.2.conv"][0].conv.groups == 32
    torch.manual_seed(0)
    small = randomize(build_classifier("mobilenet_v1", "dyrep", 10)).to(dtype).eval()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    grow(*sites(small)["features.6.conv"], generator=torch.Generator().manual_seed(1))
    _perturb(small.get_submodule("features.6.conv"), 3)
    reference = _out(small, x)
    deploy(small)
    assert rel_err(_out(small, x), reference) <= TOLERANCE[dtype]
    assert sum(p.numel() for p in small.parameters()) == sum(
        p.numel() for p in deploy(build_classifier("mobilenet_v1", "none", 10)).parameters())


def test_mobilenet_v1_dbb(dtype):
    """Table 3's MobileNet/DBB row: the stem a DBB, the 13 depthwise convs depthwise DBBs (per conv of C channels:
    a 2C-channel 1x1-kxk branch and BNs: 28C parameters more), the 1x1s plain; it deploys to the plain network."""
    from backbones.blocks import DBB
    model = build_classifier("mobilenet_v1", "dbb")
    blocks = [m for m in model.modules() if isinstance(m, DBB)]
    depthwise = [b for b in blocks if b.geometry.groups > 1]
    assert len(blocks) == 14 and len(depthwise) == 13
    stem = sum(p.numel() for p in blocks[0].parameters()) - 3 * 32 * 9 - 2 * 32
    assert sum(p.numel() for p in model.parameters()) == 4_231_976 + stem + 28 * sum(
        b.geometry.in_channels for b in depthwise)
    torch.manual_seed(0)
    small = randomize(build_classifier("mobilenet_v1", "dbb", 10)).to(dtype).eval()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    reference = _out(small, x)
    deploy(small)
    assert rel_err(_out(small, x), reference) <= TOLERANCE[dtype]
    assert sum(p.numel() for p in small.parameters()) == sum(
        p.numel() for p in deploy(build_classifier("mobilenet_v1", "none", 10)).parameters())


def test_dep_rules_cut_by_the_paper_and_by_the_official_code():
    """Eq. 9 on the last BN's gammas. Paper: the new branches' mean |gamma| spread (population std) above 0.02,
    cut those below their mean. Code: the same relative to the kxk branch, and a cut only below 0.1 too."""
    from runners.dyrep import dep_candidates
    block = grow(_host(ConvGeometry(8, 8, 3), torch.float64), "conv")
    gammas = {"origin": 2.0, "1x1": 0.5, "1x1_kxk": 0.1, "avg": 0.02, "hor": 0.4, "ver": 0.3, "identity": 0.9}
    with torch.no_grad():
        for name, value in gammas.items():
            block.norms[name].weight.fill_(-value if name == "avg" else value)  # |gamma|: the sign does not count
    # paper: mean of (0.5, 0.1, 0.02, 0.4, 0.3, 0.9) = 0.37 -> 0.1, 0.02, 0.3 are below it
    assert sorted(dep_candidates(block, "paper")) == ["1x1_kxk", "avg", "ver"]
    # code: relative to 2.0 -> (0.25, 0.05, 0.01, 0.2, 0.15, 0.45), mean 0.185, and below 0.1: 0.05, 0.01
    assert sorted(dep_candidates(block, "code")) == ["1x1_kxk", "avg"]
    with torch.no_grad():
        for name in gammas:
            block.norms[name].weight.fill_(0.01 if name != "origin" else 1.0)  # just grown: nothing to tell apart
    assert dep_candidates(block, "paper") == dep_candidates(block, "code") == []


def test_optimizer_surgery_after_a_grow_matches_a_step_built_by_hand():
    """SGD with momentum and weight decay through MMEngine's constructor (no decay on BN), two steps, then DyRep
    grows the top site: the new parameters sit in the groups a fresh constructor would give them, with empty
    momentum; the old ones keep theirs; the replaced kernel's state is gone. One more step equals the update written
    out by hand (torch's SGD: d = g + wd p; buf = mu buf + d, or d on a first step; p -= lr buf), to float64's
    rounding."""
    from mmengine.optim import build_optim_wrapper
    from runners.dyrep import DyRep
    net = _two_site_net()
    cfg = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-3),
               paramwise_cfg=dict(norm_decay_mult=0.0))
    optimizer = build_optim_wrapper(net, cfg).optimizer
    dyrep = DyRep(net, optimizer, "synflow")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()
    top = max(dyrep.saliency.averages().items(), key=lambda kv: kv[1])[0]
    replaced = net.get_submodule(top).weight
    before = {p: optimizer.state[p]["momentum_buffer"].clone() for p in net.parameters()}
    (event,) = dyrep.adjust(0)
    assert (event.kind, event.site) == ("grow", top) and replaced not in optimizer.state
    block = net.get_submodule(top)
    new = set(block.parameters())
    assert new and all(p not in optimizer.state for p in new)
    fresh = build_optim_wrapper(net, cfg).optimizer
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in fresh.param_groups for p in g["params"]}
    held = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert held == setting  # every parameter of the grown net once, with the constructor's lr and decay
    g = torch.Generator().manual_seed(9)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    expected = {}
    for p in net.parameters():
        lr, wd = held[id(p)]
        d = p.grad + wd * p.detach()
        buf = d if p in new else 0.9 * before[p] + d
        expected[p] = p.detach() - lr * buf
    optimizer.step()
    for p, value in expected.items():  # torch fuses p - lr * buf (one rounding): equal to float64's last digits
        assert torch.allclose(p.detach(), value, rtol=1e-14, atol=1e-15), tuple(p.shape)


def test_the_events_rebuild_the_structure_and_the_next_growth_is_the_same():
    """A run that grew twice and cut, checkpointed as (DyRep state, model state dict): a fresh net replays the
    events, loads the weights strictly, computes the same function and, with the same accumulated scores, grows the
    same conv next."""
    from runners.dyrep import DyRep
    net = _two_site_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    dyrep = DyRep(net, optimizer, "synflow", rule="paper")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    for epoch in range(3):
        train(net, optimizer, 2)
        if epoch == 1:  # training spreads the new branches' gammas: make one clearly weak
            with torch.no_grad():
                grown = next(m for m in net.modules() if isinstance(m, MultiBranchConv))
                for i, bn in enumerate(n for k, n in grown.norms.items() if k != "origin"):
                    bn.weight.fill_(0.5 if i % 2 else 0.001)
        dyrep.adjust(epoch)
    assert [e.kind for e in dyrep.events].count("grow") == 3 and "cut" in [e.kind for e in dyrep.events]
    train(net, optimizer, 1)  # scores accumulated since the last adjustment
    state, weights = dyrep.state_dict(), net.state_dict()
    fresh = _two_site_net()
    replay = DyRep(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05), "synflow", rule="paper")
    replay.load_state_dict(state)
    fresh.load_state_dict(weights)  # strict: the same structure
    assert rel_err(_out(fresh, x), _out(net, x)) <= 1e-12
    assert replay.saliency.averages() == dyrep.saliency.averages()
    assert dyrep.adjust(3)[0].site == replay.adjust(3)[0].site


@pytest.mark.parametrize("metric", ["synflow", "vote"])
def test_the_hook_grows_a_conv_during_mmengine_training(tmp_path, metric):
    """repbench.DyRepHook from MMEngine's registry in the suite's training (MMEngine's Runner): after each epoch the
    top conv grows; the trained net still deploys to the plain architecture. vote needs grasp, which recomputes
    the iteration's loss from the batch the hook kept."""
    from mmengine.registry import HOOKS
    import runners.dyrep  # noqa: F401 - what a config's custom_imports does
    from runners.train import train_classifier
    from suites import Recipe
    torch.manual_seed(0)
    net = build_classifier("resnet18", "none", 4)
    plain = sum(p.numel() for p in deploy(build_classifier("resnet18", "none", 4)).parameters())
    hook = HOOKS.build(dict(type="repbench.DyRepHook", interval=1, recal_batches=2, metric=metric))
    recipe = Recipe(dataset="synthetic", resolution=32, batch=2, epochs=2, max_iters=2, checkpoints=False)
    train_classifier(net, recipe, tmp_path, hooks=[hook])
    assert all(e.score is not None for e in hook.dyrep.events)
    grows = [e for e in hook.dyrep.events if e.kind == "grow"]
    assert [e.epoch for e in grows] == [0, 1] and len({e.site for e in grows}) == 2
    assert sum(isinstance(m, MultiBranchConv) for m in net.modules()) == 2
    assert sum(p.numel() for p in deploy(net).parameters()) == plain


def test_a_resumed_run_continues_with_the_grown_network(tmp_path):
    """Checkpoints carry DyRep's events and scores: a run stopped after its first epoch (one conv grown) and started
    again from its checkpoint on a fresh plain network rebuilds the grown structure before loading the weights (a
    strict load) and grows a second conv after the next epoch."""
    import runners.dyrep  # noqa: F401
    from mmengine.registry import HOOKS
    from runners.train import train_classifier
    from suites import Recipe

    def run(epochs):
        torch.manual_seed(0)
        net = build_classifier("vgg16_cifar", "dyrep", 4)
        hook = HOOKS.build(dict(type="repbench.DyRepHook", interval=1, recal_batches=1, module="net"))
        recipe = Recipe(dataset="synthetic_cifar", resolution=32, batch=2, epochs=epochs, max_iters=1)
        train_classifier(net, recipe, tmp_path / "data", run_dir=tmp_path / "run", hooks=[hook])
        return net, hook

    first, hook = run(1)
    assert [e.kind for e in hook.dyrep.events] == ["grow"]
    resumed, hook = run(2)  # resumes from the epoch-1 checkpoint, trains epoch 2
    assert [(e.epoch, e.kind) for e in hook.dyrep.events] == [(0, "grow"), (1, "grow")]
    assert all(isinstance(resumed.get_submodule(e.site), MultiBranchConv) for e in hook.dyrep.events)
    assert sum(isinstance(m, MultiBranchConv) for m in resumed.modules()) == 2


def test_dyrep_table2_smoke_records_events_and_averages_over_training(tmp_path):
    """run_suite dyrep.table2 at smoke, its CIFAR-10 Origin and DyRep rows: DyRep's growths are events of its run;
    its average training-form params and MACs (rebuilt from the events) exceed Origin's, whose averages are its
    own counts; the report puts them beside the printed averages."""
    import json
    import sqlite3
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    done = run_cli("dyrep.table2", "--only", "CIFAR-10/Origin", "CIFAR-10/DyRep", "--db", f"sqlite:///{db}",
                   "--data-root", str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        events = c.execute("SELECT row_name, epoch, kind, site, branches FROM events JOIN runs ON runs.id = run_id "
                           "ORDER BY events.id").fetchall()
        values = {(row, name): value for row, name, value in c.execute(
            "SELECT row_name, name, value FROM metrics JOIN runs ON runs.id = run_id")}
        per_epoch = c.execute("SELECT value FROM metrics JOIN runs ON runs.id = run_id WHERE name = 'epoch_hours' "
                              "AND row_name = 'CIFAR-10/DyRep' ORDER BY step").fetchall()
    assert len(per_epoch) == 2 and sum(v for (v,) in per_epoch) == pytest.approx(values[("CIFAR-10/DyRep",
                                                                                          "train_hours")])
    assert [(row, epoch, kind) for row, epoch, kind, _, _ in events] == [("CIFAR-10/DyRep", 0, "grow"),
                                                                          ("CIFAR-10/DyRep", 1, "grow")]
    assert all(site.endswith(".conv") and "origin" in json.loads(branches) for *_, site, branches in events)
    origin, dyrep = "CIFAR-10/Origin", "CIFAR-10/DyRep"
    assert values[(origin, "params_avg")] == values[(origin, "params_train")]
    # at 32x32 as the paper: CIFAR-10's 313,463,808 MACs with smoke's 4-class head instead of 10 classes
    assert values[(origin, "macs_avg")] == values[(origin, "macs_train")] == 313_463_808 - 512 * (10 - 4)
    assert values[(dyrep, "params_avg")] > values[(origin, "params_avg")]
    assert values[(dyrep, "macs_avg")] > values[(origin, "macs_avg")]
    assert values[(dyrep, "train_hours")] > 0
    assert run_cli("report", "dyrep.table2", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"),
                   cwd=tmp_path).returncode == 0
    text = (tmp_path / "out" / "dyrep.table2.md").read_text()
    assert "| CIFAR-10/DyRep | 14.98M | 14.98M | 313.46M | 313.46M | 26.4 M |" in text


def test_without_dep_nothing_is_cut():
    """DyRep Table 6's "w/o Dep": the same adjustment grows but never cuts, however spread the gammas."""
    from runners.dyrep import DyRep
    for dep, cuts in ((True, 1), (False, 0)):
        net = _two_site_net()
        dyrep = DyRep(net, None, "random", dep=dep)
        dyrep.saliency.sums = {"random": {"0.conv": 1.0, "2.conv": 2.0}}
        dyrep.saliency.counts = {"0.conv": 1, "2.conv": 1}
        dyrep.adjust(0)
        with torch.no_grad():
            for i, bn in enumerate(n for k, n in net.get_submodule("2.conv").norms.items() if k != "origin"):
                bn.weight.fill_(0.5 if i % 2 else 0.001)
        events = dyrep.adjust(1)
        assert [e.kind for e in events].count("cut") == cuts, dep


def test_dyrep_tables_are_declared_as_printed(tmp_path):
    """Printed values of DyRep Tables 2, 3, 6, 9 and 10 as printed; rows whose model or metric is not built are
    declared (shown, not run): the plan skips them and naming one is a one-line error, exit 2."""
    import suites
    from runners.jobs import plan
    from test_cli import run_cli
    t2, t3, t6, t9, t10 = (suites.get_table(f"dyrep.table{n}") for n in (2, 3, 6, 9, 10))
    assert t2.row("CIFAR-10/DyRep").paper["macs_avg"].text == "597 M" and t2.row("CIFAR-100/DyRep").paper[
        "params_avg"].text == "27.1 M"
    assert t2.recipe("paper", t2.row("CIFAR-100/DBB")).dataset == "cifar100"
    paper = t2.recipes["paper"]
    assert (paper.epochs, paper.batch, paper.lr, paper.dyrep_interval, paper.dyrep_max_epoch) == (600, 128, 0.1, 15, 500)
    assert paper.decay_all and not paper.nesterov
    assert [r.paper["top1"].text for r in t6.rows] == ["94.68±0.08", "95.22±0.13", "95.03±0.15"]
    assert t6.row("DyRep w/o Dep").dyrep.dep is False
    assert [t9.recipe("paper", r).dyrep_interval for r in t9.rows[2:]] == [5, 10, 15, 30, 50]
    assert t3.row("ResNet-18/Origin").paper["top1"].text == "69.54" and t3.recipes["paper"].nesterov
    assert not any(r.declared for t in (t3, t10) for r in t.rows)  # MobileNet/DBB: the depthwise DBB
    assert t3.recipe("paper", t3.row("MobileNet/DyRep")).dyrep_max_epoch == 70
    assert t10.row("CIFAR-100/synflow").paper["top1"].text == "74.91"
    assert {t10.row(f"CIFAR-10/{m}").dyrep.metric for m in ("grasp", "vote")} == {"grasp", "vote"}
    jobs = plan(t10, "smoke", 1, None, str(tmp_path), "sqlite://")
    assert len(jobs) == 14
    done = run_cli("dyrep.table4", "--only", "ODBB(A2)", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().endswith("RepNAS's searched ODBB structure: quoted as printed, "
                                                                 "not run")
    assert len(done.stderr.strip().splitlines()) == 1


def test_tables_4_and_8_grow_in_repvgg_blocks_and_in_dbbs_op_space(tmp_path):
    """Table 4: DyRep-X rows are RepVGG-X (rep repvgg) with DyRep settings, the B2g4 / B3 rows on the 200-epoch strong
    recipe, ODBB and ResNeXt-101 declared; Table 8: DyRep over DBB's 4 ops and DBB over DyRep's 7, recorded in the
    runs' configs (the default op space leaves earlier run keys as they were)."""
    import suites
    from runners.jobs import plan
    t4, t8 = suites.get_table("dyrep.table4"), suites.get_table("dyrep.table8")
    assert [r.name for r in t4.rows if r.declared] == ["ODBB(A2)", "ODBB(B3)", "ResNeXt-101"]
    a2 = t4.row("DyRep-A2")
    assert (a2.arch, a2.rep, a2.dyrep is not None, a2.paper["throughput"].text) == ("repvgg_a2", "repvgg", True, "1322")
    strong = t4.recipe("paper", t4.row("RepVGG-B3"))
    assert (strong.epochs, strong.randaugment, strong.label_smoothing, strong.warmup_epochs) == (200, 9, 0.1, 5.0)
    assert t4.recipe("paper", a2).epochs == 120 and t4.row("ResNet-50").paper["top1"].text == "76.31"
    jobs = {j.spec.row_name: j for j in plan(t8, "smoke", 1, None, str(tmp_path), "sqlite://")}
    assert set(jobs) == {"Origin", "DBB (4 ops)", "DyRep (4 ops)", "DBB* (7 ops)", "DyRep (7 ops)"}
    assert jobs["DyRep (4 ops)"].spec.config["dyrep"]["ops"] == "dbb"
    assert "ops" not in jobs["DyRep (7 ops)"].spec.config["dyrep"]
    assert jobs["DBB* (7 ops)"].spec.config["variant"]["branches"] == list(OPS)
    assert t8.row("DyRep (7 ops)").paper["macs_avg"].value == 5.05
    with pytest.raises(ValueError, match="only rows of dyrep, repvgg grow"):
        suites.Row("x", "resnet18", "dbb", dyrep=suites.DyRep())


def test_table7_retrains_the_structures_a_dyrep_run_grew(tmp_path):
    """dyrep.table7 at smoke, DyRep-200 and DyRep-600 (the structures after 1 and 2 of smoke's 2 epochs): the DyRep
    row runs first, once; each fixed row replays its events up to its epoch, trains without growing (no events of
    its own), and its training-form size is that structure's, constant over training."""
    import sqlite3
    from backbones import build_classifier
    from runners.dyrep import Event, replay
    from runners.probes import count_params
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    done = run_cli("dyrep.table7", "--only", "DyRep-200", "DyRep-600", "--db", f"sqlite:///{db}", "--data-root",
                   str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.index("DyRep (seed 0): finished") < done.stdout.index("DyRep-200 (seed 0): finished")
    with sqlite3.connect(db) as c:
        runs = dict(c.execute("SELECT row_name, id FROM runs").fetchall())
        events = c.execute("SELECT run_id, epoch, kind, site, branches FROM events ORDER BY id").fetchall()
        values = {(run, name): value for run, name, value in c.execute("SELECT run_id, name, value FROM metrics")}
    assert set(runs) == {"DyRep", "DyRep-200", "DyRep-600"} and {e[0] for e in events} == {runs["DyRep"]}
    import json
    for row, upto in (("DyRep-200", 1), ("DyRep-600", 2)):
        model = build_classifier("vgg16_cifar", "none", 4)
        replay(model, [Event(-1, kind, site, json.loads(branches)) for _, epoch, kind, site, branches in events
                       if epoch < upto])
        assert values[(runs[row], "params_avg")] == values[(runs[row], "params_train")] == count_params(model), row


def test_table3_report_says_the_printed_resnet_baselines_were_quoted(tmp_path):
    """The report of dyrep.table3, run or not: ResNet-18's printed Origin 69.54 is DBB's quoted baseline (DyRep
    issue #1), and the suite's own Origin, trained on the DyRep rows' recipe, is what to compare with."""
    from results import Store
    from test_cli import run_cli
    Store(f"sqlite:///{tmp_path / 'r.sqlite'}").close()
    done = run_cli("report", "dyrep.table3", "--db", f"sqlite:///{tmp_path / 'r.sqlite'}", "--out",
                   str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = " ".join((tmp_path / "out" / "dyrep.table3.md").read_text().split())
    assert "Note: The printed Origin accuracies of ResNet-18 (69.54)" in text and "DyRep issue #1" in text
    assert "The suite's Origin rows train with the DyRep rows' recipe" in text


def test_table4_smoke_grows_inside_repvgg_blocks_and_deploys_to_repvgg(tmp_path):
    """run_suite dyrep.table4 --only DyRep-A2 at smoke: the growths are RepVGG blocks' 3x3 branches (events of the
    run) and the deployed network the suite measured is RepVGG-A2's, to the parameter."""
    import sqlite3
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    done = run_cli("dyrep.table4", "--only", "DyRep-A2", "--db", f"sqlite:///{db}", "--data-root",
                   str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        sites_grown = [s for (s,) in c.execute("SELECT site FROM events WHERE kind = 'grow' ORDER BY id")]
        values = dict(c.execute("SELECT name, value FROM metrics"))
    assert len(sites_grown) == 2 and all(s.endswith(".branches.origin") for s in sites_grown)
    assert values["params_deploy"] == sum(p.numel() for p in deploy(build_classifier("repvgg_a2", "repvgg", 4))
                                          .parameters())


def _dyrep_rank(rank: int, port: int, root: str, out: str) -> None:
    import os
    from mmengine.registry import HOOKS
    import runners.dyrep  # noqa: F401
    from runners.launch import DistEnv, destroy_process_group, init_process_group
    from runners.train import train_classifier
    from suites import Recipe
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = DistEnv(rank, 2, rank, 2)
    init_process_group(dist, "cpu", timeout_s=120)
    torch.manual_seed(0)
    net = build_classifier("vgg16_cifar", "dyrep", 4).double()
    hook = HOOKS.build(dict(type="repbench.DyRepHook", interval=1, max_epoch=2, recal_batches=2, module="net"))
    recipe = Recipe(dataset="synthetic_cifar", resolution=32, batch=2, devices=2, epochs=3, max_iters=2, lr=0.05,
                    checkpoints=False)
    train_classifier(net, recipe, Path(root), seed=0, device="cpu", dist=dist, hooks=[hook])
    torch.save({"events": [(e.epoch, e.kind, e.site) for e in hook.dyrep.events],
                "params": {k: v.detach().clone() for k, v in net.named_parameters()}}, f"{out}.{rank}")
    destroy_process_group()


def test_two_process_ddp_training_grows_the_same_conv_on_both_ranks_and_keeps_them_equal(tmp_path):
    """DyRep under gloo DDP (2 processes): the saliency reads the all-reduced gradients, so both ranks grow the same
    convs; after each change the model is re-wrapped, so the new branches' gradients are all-reduced too: after
    training that grew twice, every parameter is identical on the two ranks and the first grown block trained."""
    import multiprocessing as mp
    from runners.launch import free_port
    context, port = mp.get_context("spawn"), free_port()
    processes = [context.Process(target=_dyrep_rank, args=(r, port, str(tmp_path / "data"), str(tmp_path / "out")))
                 for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(300)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    ranks = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=True) for r in range(2)]
    assert ranks[0]["events"] == ranks[1]["events"] and [e[:2] for e in ranks[0]["events"]] == [(0, "grow"),
                                                                                              (1, "grow")]
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    first = ranks[0]["events"][0][2]
    grown = [v for k, v in ranks[0]["params"].items() if k.startswith(f"{first}.norms.") and "origin" not in k
             and k.endswith("weight")]
    assert grown and any(float((w - GAMMA).abs().max()) > 0 for w in grown)  # trained past their initial 0.01


def test_table5_grows_during_finetuning_and_the_grown_segmentor_deploys(tmp_path):
    """dyrep.table5's rows: Origin, DBB (C), DyRep (C), DyRep (D) and (C+D) per model, D starting from the plain
    ResNet-50's run (its pretrained rep). PSPNet/DyRep (D) at smoke grows the mm backbone after each of its two
    steps (the DyRep hook by step, sites named within the backbone's network, events stored with the run); the grown
    segmentor is deployed and evaluates to the same mIoU. The report, before anything ran, lists the printed values."""
    import sqlite3

    import suites
    from reports.build import build_table_report
    from reports.render import render_markdown
    from test_cli import run_cli
    table = suites.get_table("dyrep.table5")
    assert not any(r.declared for r in table.rows)
    assert table.row("FPN/DyRep (D)").pretrained_rep == "none" and table.row("FPN/DyRep (C+D)").pretrained_rep is None
    assert table.recipe("paper", table.row("PSPNet/DyRep (D)")).dyrep_every == 5 / 120
    assert table.recipe("paper", table.row("PSPNet/DyRep (C)")).dyrep_every is None
    text = render_markdown(build_table_report(table, None))
    assert "| FPN/DyRep (C+D) | 77.08 | 38.1 | – |" in text and "| PSPNet/Origin | 76.13 | – | 77.85 |" in text
    db = tmp_path / "db.sqlite"
    done = run_cli("dyrep.table5", "--only", "PSPNet/DyRep (D)", "--db", f"sqlite:///{db}", "--data-root",
                   str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(db) as c:
        events = c.execute("SELECT epoch, kind, site FROM events ORDER BY epoch").fetchall()
        values = dict(c.execute("SELECT name, value FROM metrics"))
    assert [(e, k) for e, k, _ in events] == [(0, "grow"), (1, "grow")]
    assert all(site.endswith(".conv") and not site.startswith("backbone") for _, _, site in events)
    assert values["miou_deployed"] == pytest.approx(values["miou"], abs=1e-6)
    assert "DyRep after step 1: grow" in done.stdout


def test_a_dyrep_c_backbone_loads_its_grown_structure_into_the_mm_backbone(tmp_path):
    """DyRep (C): the downstream backbone starts from the grown ImageNet network. Its checkpoint's events grow the mm
    backbone's plain ResNet the same way before the strict load: the backbone's features equal the grown
    classifier's (float32: the backbone is built, and loads, in float32)."""
    from dataclasses import asdict
    from backbones import save_checkpoint
    from backbones.mm import ResNet
    from runners.dyrep import DyRep
    torch.manual_seed(0)
    net = randomize(build_classifier("resnet18", "dyrep", 10))
    dyrep = DyRep(net)
    dyrep.saliency.counts = {"layer2.0.conv1.conv": 1, "layer3.1.conv2.conv": 1}
    dyrep.saliency.sums = {"synflow": {"layer2.0.conv1.conv": 1.0, "layer3.1.conv2.conv": 2.0}}
    dyrep.adjust(0)
    assert dyrep.events and dyrep.events[0].site == "layer3.1.conv2.conv"
    _perturb(net, 1)
    path = save_checkpoint(net, tmp_path / "w.pth", events=[asdict(e) for e in dyrep.events])
    backbone = ResNet(depth=18, rep="dyrep", pretrained=str(path), out_indices=(0, 1, 2, 3)).eval()
    assert backbone.net.get_submodule("layer3.1.conv2.conv").branches  # grown before the load
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        mine, theirs = backbone(x), net.eval().forward_features(x)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
