"""RepOptimizers: CSLA = GR (Appendix A) for SGD exactly and for AdamW within the derived epsilon bound, both rules
needed, the Grad Mult of Eq. 3, and scales files (ours and the official layout)."""

import math

import pytest
import torch

from backbones.branches import ConvGeometry
from backbones.repopt import (CSLA, BlockScales, RepOptConvBN, build_repoptimizer, grad_mult, hs_scale_init,
                              load_scales, reinitialize, save_scales, scales_of, set_constants)

GEOMETRIES = [  # (in, out, stride, dilation, groups): with and without the identity branch
    (4, 4, 1, 1, 1), (4, 6, 1, 1, 1), (4, 4, 2, 1, 1), (6, 6, 1, 2, 1), (4, 4, 1, 1, 2)]


def _pair(shape, sign_mix=True, seed=0):
    """A CSLA block with random constants and random trainable parameters (BN affine too), and the RepOpt target
    made from it by reinitialize() with the same fresh 1x1 kernel: the two start with equal outputs."""
    torch.manual_seed(seed)
    cin, cout, stride, dilation, groups = shape
    g = ConvGeometry(cin, cout, 3, stride, None, dilation, groups)
    target = RepOptConvBN(g).double()
    csla = CSLA(g, trainable=False).double()
    low = -1.5 if sign_mix else 0.2
    s = torch.empty(cout, dtype=torch.float64).uniform_(low, 1.5)
    t = torch.empty(cout, dtype=torch.float64).uniform_(low, 1.5)
    d = torch.empty(cout, dtype=torch.float64).uniform_(0.2, 1.5) if csla.identity is not None else None
    with torch.no_grad():
        csla.scale_conv.copy_(s)
        csla.scale_1x1.copy_(t)
        if d is not None:
            csla.scale_identity.copy_(d)
        csla.conv.weight.copy_(target.conv.weight)  # the target's kernel as built is the CSLA's 3x3 ...
        k1 = torch.empty_like(csla.conv_1x1.weight)
        torch.nn.init.kaiming_uniform_(k1, a=math.sqrt(5), generator=torch.Generator().manual_seed(7))
        csla.conv_1x1.weight.copy_(k1)  # ... and reinitialize() draws the same fresh 1x1 kernel
        for bn in (csla.bn,):
            bn.bias.uniform_(-0.5, 0.5)
    reinitialize(target, [BlockScales(s, t, d)], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        target.bn.bias.copy_(csla.bn.bias)
    return g, csla, target


def _groups(csla_or_target):
    """Decay on the convs' weights and the identity scale (the official rule); none on BN."""
    decay = [p for n, p in csla_or_target.named_parameters() if not n.startswith("bn.")]
    return [{"params": decay}, {"params": list(csla_or_target.bn.parameters()), "weight_decay": 0.0}]


def _train_side_by_side(g, csla, target, make_csla_opt, make_target_opt, steps=50, seed=1):
    torch.manual_seed(seed)
    opt_a, opt_b = make_csla_opt(_groups(csla)), make_target_opt(_groups(target))
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(3, g.in_channels, 8, 8, dtype=torch.float64)
        goal = torch.randn(3, g.out_channels, 8 // g.stride, 8 // g.stride, dtype=torch.float64)
        outs = []
        for model, opt in ((csla, opt_a), (target, opt_b)):
            opt.zero_grad()
            y = model(x)
            ((y - goal).pow(2).mean() + y.tanh().mean()).backward()
            opt.step()
            outs.append(y.detach())
        worst = max(worst, ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item())
    return worst


SGD = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)


@pytest.mark.parametrize("shape", GEOMETRIES)
def test_csla_with_sgd_equals_the_single_conv_with_the_repoptimizer(shape):
    g, csla, target = _pair(shape)
    with torch.no_grad():
        x = torch.randn(2, g.in_channels, 8, 8, dtype=torch.float64)
        assert torch.allclose(csla.eval()(x), target.eval()(x), rtol=0, atol=1e-12)  # Rule of Initialization
    csla.train(), target.train()
    error = _train_side_by_side(g, csla, target, lambda groups: torch.optim.SGD(groups, **SGD),
                                lambda groups: build_repoptimizer("sgd", target, groups, **SGD))
    assert error <= 1e-9
    with torch.no_grad():  # and the trained kernels themselves agree
        assert torch.allclose(csla.linear_kernel(), target.conv.weight, rtol=0, atol=1e-9)


@pytest.mark.parametrize("ablation", ["no_reinit", "no_grad_mult"])
def test_either_rule_removed_breaks_the_equivalence(ablation):
    g, csla, target = _pair(GEOMETRIES[0])
    if ablation == "no_reinit":  # the target keeps its kernel as built; only the Grad Mults are set
        _, _, target = _pair(GEOMETRIES[0])
        with torch.no_grad():
            target.conv.weight.copy_(csla.conv.weight)
        make = lambda groups: build_repoptimizer("sgd", target, groups, **SGD)  # noqa: E731
    else:
        make = lambda groups: torch.optim.SGD(groups, **SGD)  # noqa: E731
    error = _train_side_by_side(g, csla, target, lambda groups: torch.optim.SGD(groups, **SGD), make)
    assert error > 1e-3


ADAMW = dict(lr=0.01, weight_decay=0.05, eps=1e-8)


@pytest.mark.parametrize("shape", GEOMETRIES[:3])
def test_csla_with_adamw_matches_within_the_epsilon_bound_for_positive_scales(shape):
    """The bound, derived for positive scales c_b (M = sum c_b over the n_b branches covering an element): one step
    of CSLA + AdamW moves the equivalent kernel by lr * sum_b c_b * m / (sqrt(v) + eps / c_b), the RepOptimizer by
    lr * M * m / (sqrt(v) + eps / M) (m, v: bias-corrected moments of the kernel's gradient G), so per element

        |difference| = lr * |m| * sum_b c_b * eps * (1/c_b - 1/M) / ((sqrt(v) + eps/c_b) (sqrt(v) + eps/M))
                    <= lr * eps * (n_b - 1) * |m| / v.

    Checked at every step of a 50-step CSLA trajectory, the RepOptimizer started each time from the CSLA's state
    (kernel, BN, moments); then both run free for 50 steps and stay within 1e-5 of each other (relative output error)."""
    g, csla, target = _pair(shape, sign_mix=False)
    torch.manual_seed(3)
    opt_a = torch.optim.AdamW(_groups(csla), **ADAMW)
    opt_b = build_repoptimizer("adamw", target, _groups(target), **ADAMW)
    weight = target.conv.weight
    mult = opt_b.grad_mults[weight]
    ones = torch.ones(g.out_channels, dtype=torch.float64)
    branches = grad_mult(g, ones, ones, csla.identity is not None, 1)  # n_b per element
    s = csla.scale_conv.reshape(-1, 1, 1, 1)
    for step in range(1, 51):
        with torch.no_grad():  # the RepOptimizer takes the CSLA's state
            weight.copy_(csla.linear_kernel())
            target.bn.load_state_dict(csla.bn.state_dict())
            if step > 1:
                branch = opt_a.state[csla.conv.weight]  # the 3x3 branch's gradient is s * G
                opt_b.state[weight] = {"step": torch.tensor(float(step - 1)),
                                       "exp_avg": branch["exp_avg"] / s * mult,
                                       "exp_avg_sq": branch["exp_avg_sq"] / s ** 2 * mult ** 2}
        x = torch.randn(3, g.in_channels, 8, 8, dtype=torch.float64)
        goal = torch.randn(3, g.out_channels, 8 // g.stride, 8 // g.stride, dtype=torch.float64)
        for model, opt in ((csla, opt_a), (target, opt_b)):
            opt.zero_grad()
            y = model(x)
            ((y - goal).pow(2).mean() + y.tanh().mean()).backward()
            opt.step()
        state = opt_b.state[weight]
        m = state["exp_avg"] / mult / (1 - 0.9 ** step)
        v = state["exp_avg_sq"] / mult ** 2 / (1 - 0.999 ** step)
        bound = ADAMW["lr"] * ADAMW["eps"] * (branches - 1) * m.abs() / v
        with torch.no_grad():
            gap = (csla.linear_kernel() - weight).abs()
        assert torch.all(gap <= bound + 1e-14 * weight.abs().max()), (step, (gap - bound).max())
    _, csla, target = _pair(shape, sign_mix=False)
    free = _train_side_by_side(g, csla, target, lambda groups: torch.optim.AdamW(groups, **ADAMW),
                               lambda groups: build_repoptimizer("adamw", target, groups, **ADAMW))
    assert free < 1e-5


def test_adamw_with_a_negative_scale_is_not_equivalent():
    g, csla, target = _pair(GEOMETRIES[0], sign_mix=False)
    with torch.no_grad():
        csla.scale_1x1[0] = -csla.scale_1x1[0]
        set_constants(target, BlockScales(csla.scale_conv, csla.scale_1x1, csla.scale_identity.detach()))
        target.conv.weight.copy_(csla.linear_kernel())
    error = _train_side_by_side(g, csla, target, lambda groups: torch.optim.AdamW(groups, **ADAMW),
                                lambda groups: build_repoptimizer("adamw", target, groups, **ADAMW), steps=20)
    assert error > 1e-2


def test_grad_mult_is_eq3():
    """Eq. 3 by its cases: s^2 + t^2 (+1 on the diagonal) at the centre, s^2 elsewhere; power 1 likewise."""
    g = ConvGeometry(3, 3, 3)
    s, t = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1.5, 0.25, 3.0])
    for power in (1, 2):
        m = grad_mult(g, s, t, True, power)
        for c in range(3):
            for d in range(3):
                for p in range(3):
                    for q in range(3):
                        expected = s[c] ** power
                        if (p, q) == (1, 1):
                            expected = expected + t[c] ** power + (1.0 if c == d else 0.0)
                        assert m[c, d, p, q] == pytest.approx(float(expected))
    assert torch.all(grad_mult(ConvGeometry(3, 4, 3), s.repeat(2)[:4], t.repeat(2)[:4], False, 2)[:, :, 1, 1]
                     == (s.repeat(2)[:4] ** 2 + t.repeat(2)[:4] ** 2).reshape(-1, 1))


def test_clipping_is_refused_and_scales_must_fit():
    _, _, target = _pair(GEOMETRIES[0])
    with pytest.raises(ValueError, match="clipping"):
        build_repoptimizer("sgd", target, lr=0.1, clip_grad=5.0)
    with pytest.raises(ValueError, match="identity"):
        reinitialize(RepOptConvBN(ConvGeometry(4, 4, 3)), [BlockScales(torch.ones(4), torch.ones(4))])
    with pytest.raises(ValueError, match="2 blocks"):
        reinitialize(RepOptConvBN(ConvGeometry(4, 4, 3)), [BlockScales(torch.ones(4), torch.ones(4))] * 2)


def test_hs_init_paper_and_code():
    assert [round(hs_scale_init(layer, "paper"), 3) for layer in (1, 2, 3)] == [1.414, 1.0, 0.816]
    assert [round(hs_scale_init(layer, "code"), 3) for layer in (0, 1, 2, 3, 16)] == [1.0, 1.0, 1.414, 1.0, 0.365]


def test_scales_round_trip_and_the_official_layout(tmp_path):
    g = ConvGeometry(4, 4, 3)
    hs = torch.nn.Sequential(CSLA(ConvGeometry(3, 4, 3, 2), trainable=True), CSLA(g, trainable=True),
                             CSLA(g, trainable=True))
    with torch.no_grad():
        for p in hs.parameters():
            p.uniform_(-1, 1)
    scales = scales_of(hs)
    assert [s.identity is None for s in scales] == [True, False, False]
    back = load_scales(save_scales(scales, tmp_path / "s.pth"))
    for a, b in zip(scales, back):
        assert torch.equal(a.conv, b.conv) and torch.equal(a.one, b.one)
        assert (a.identity is None) == (b.identity is None)
    # the official file: stage0.scale_conv.weight, stage{i}.{j}.scale_*.weight, wrapped in 'model', out of order
    official = {"stage1.10.scale_conv.weight": torch.full((4,), 3.0), "stage1.10.scale_1x1.weight": torch.ones(4),
                "stage1.2.scale_conv.weight": torch.full((4,), 2.0), "stage1.2.scale_1x1.weight": torch.ones(4),
                "stage1.2.scale_identity.weight": torch.ones(4),
                "stage0.scale_conv.weight": torch.full((4,), 1.0), "stage0.scale_1x1.weight": torch.ones(4),
                "linear.weight": torch.zeros(100, 4)}
    torch.save({"model": official}, tmp_path / "official.pth")
    read = load_scales(tmp_path / "official.pth")
    assert [float(s.conv[0]) for s in read] == [1.0, 2.0, 3.0]
    assert [s.identity is not None for s in read] == [False, True, False]
    (tmp_path / "bad.pth").write_bytes(b"not a file of tensors")
    with pytest.raises(Exception):
        load_scales(tmp_path / "bad.pth")


def test_a_csla_network_with_sgd_equals_the_repopt_network_with_the_repoptimizer():
    """Network level, through reinitialize() on a whole RepOpt-VGG-shaped net (stem, stages with and without
    identity, ReLUs, FC): the HS model's scales -> the target re-initialised by Eq. 4 and trained with the
    RepOptimizer; the CSLA net with the same constants, kernels and fresh 1x1s trained with torch's SGD. 20 steps,
    float64: the same logits (relative error <= 1e-9)."""
    from backbones.networks import RepVGG
    from backbones.repopt import csla_blocks, target_blocks
    from backbones.variants import resolve_variant
    from conftest import randomize

    arch = dict(layers=(1, 2, 2, 1), widths=(0.25, 0.25, 0.25, 0.25), num_classes=5)
    torch.manual_seed(0)
    hs = randomize(RepVGG(config=resolve_variant("hs"), **arch).double())
    csla = RepVGG(config=resolve_variant("csla"), **arch).double()
    target = RepVGG(config=resolve_variant("repopt"), **arch).double()
    scales = scales_of(hs)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for c, t, s in zip(csla_blocks(csla), target_blocks(target), scales):
            c.conv.weight.copy_(t.conv.weight)
            torch.nn.init.kaiming_uniform_(c.conv_1x1.weight, a=math.sqrt(5), generator=generator)
            c.scale_conv.copy_(s.conv)
            c.scale_1x1.copy_(s.one)
            if s.identity is not None:
                c.scale_identity.copy_(s.identity)
        csla.fc.load_state_dict(target.fc.state_dict())
    reinitialize(target, scales, generator=torch.Generator().manual_seed(11))

    def groups(model):
        decay = [p for n, p in model.named_parameters() if ".bn." not in n and not n.endswith("fc.bias")]
        rest = [p for n, p in model.named_parameters() if ".bn." in n or n.endswith("fc.bias")]
        return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]

    opt_a = torch.optim.SGD(groups(csla), **SGD)
    opt_b = build_repoptimizer("sgd", target, groups(target), **SGD)
    torch.manual_seed(1)
    for _ in range(20):
        x, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (4,))
        logits = []
        for model, opt in ((csla, opt_a), (target, opt_b)):
            opt.zero_grad()
            out = model(x)
            torch.nn.functional.cross_entropy(out, labels).backward()
            opt.step()
            logits.append(out.detach())
        assert ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item() <= 1e-9


@pytest.mark.parametrize("kind", ["RepOptimizerSGD", "RepOptimizerAdamW"])
def test_mmengine_builds_the_repoptimizer_from_a_config(kind):
    """optim_wrapper with the repbench constructor: every RepOpt conv gets its Grad Mult at the optimizer's power,
    and one step equals build_repoptimizer's; clip_grad is refused."""
    import copy

    from mmengine.optim import build_optim_wrapper

    import backbones  # noqa: F401 - registers the repbench scope
    from backbones import build_classifier
    from backbones.repopt import target_blocks

    torch.manual_seed(0)
    model = build_classifier("repvgg_a0", "repopt", num_classes=3)
    hs = build_classifier("repvgg_a0", "hs", num_classes=3)
    reinitialize(model, scales_of(hs))
    settings = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=4e-5) if kind.endswith("SGD") else dict(lr=0.01)
    twin = copy.deepcopy(model)
    cfg = dict(constructor="repbench.RepOptimizerConstructor", optimizer=dict(type=f"repbench.{kind}", **settings))
    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg))
    mults = wrapper.optimizer.grad_mults
    assert set(mults) == {b.conv.weight for b in target_blocks(model)} and len(mults) == 22
    reference = build_repoptimizer("sgd" if kind.endswith("SGD") else "adamw", twin, **settings)
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for net, step in ((model, wrapper.update_params), (twin, None)):
        loss = torch.nn.functional.cross_entropy(net(x), labels)
        if step:
            step(loss)
        else:
            reference.zero_grad()
            loss.backward()
            reference.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="clipping"):
        build_optim_wrapper(model, dict(cfg, clip_grad=dict(max_norm=5.0)))


def test_cost_probes_step_a_repopt_target_with_its_repoptimizer():
    """The training-cost probes time what RepOpt really runs: a target's step includes the Grad Mults."""
    import copy

    from backbones import build_classifier
    from runners.probes import make_train_step

    torch.manual_seed(0)
    model = build_classifier("repvgg_a0", "repopt", num_classes=4)
    reinitialize(model, scales_of(randomize_scales(build_classifier("repvgg_a0", "hs", num_classes=4))))
    twins = {kind: copy.deepcopy(model) for kind in ("repopt", "sgd")}
    make_train_step(model, 2, 32, 4, "cpu")()
    generator = torch.Generator().manual_seed(0)  # the probe's fixed batch
    x, y = torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 4, (2,), generator=generator)
    settings = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
    for kind, twin in twins.items():
        opt = build_repoptimizer("sgd", twin, **settings) if kind == "repopt" else torch.optim.SGD(
            twin.parameters(), **settings)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        opt.step()
    same = {kind: all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
            for kind, twin in twins.items()}
    assert same == {"repopt": True, "sgd": False}


def randomize_scales(model):
    with torch.no_grad():
        for name, buffer in [*model.named_parameters(), *model.named_buffers()]:
            if name.rsplit(".", 1)[-1].startswith("scale_"):
                buffer.uniform_(0.2, 1.5)
    return model


@pytest.mark.parametrize("timing", ["interleaved", "isolated"])
def test_cost_benchmark_compares_repopt_with_repvgg_and_the_plain_target(tmp_path, timing):
    """RepOpt-VGG beside RepVGG and the plain target: steps interleaved in one process (paired ratios), or
    ``--isolated``: each model timed alone in a fresh child, as separate training scripts would run (ratios of
    medians, with the interval the two interquartile ranges allow)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "cost.json"
    from backbones import build_classifier
    from runners.cost_benchmark import layout_repvgg
    methods = ["repvgg", "repopt"] + (["repvgg layout"] if timing == "interleaved" else [])
    done = subprocess.run([sys.executable, "-m", "runners.cost_benchmark", "--arch", "repvgg_a0", "--methods",
                           *methods, "--cell", "2x32", "--warmup", "1", "--steps", "3", "--json", str(out)]
                          + (["--isolated"] if timing == "isolated" else []), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    [cell] = json.loads(out.read_text())
    assert set(cell["cell"]) == {"none", *methods} and cell["repopt_speedup_over_repvgg"] > 0
    # the official baseline's layout is this suite's RepVGG: the same parameters
    assert sum(p.numel() for p in layout_repvgg("repvgg_a0").parameters()) == sum(
        p.numel() for p in build_classifier("repvgg_a0", "repvgg").parameters())
    assert "speed-up over RepVGG" in done.stdout and cell["timing"] == timing
    for name, m in cell["cell"].items():
        assert ("alone in a fresh child process" in m["time_method"]) == (timing == "isolated")
        assert m["time_x_q1"] <= m["time_x"] <= m["time_x_q3"] and (name != "none" or m["time_x"] == 1.0)
    assert cell["repopt_speedup_over_repvgg"] == pytest.approx(cell["cell"]["repvgg"]["time_s"]
                                                               / cell["cell"]["repopt"]["time_s"])


def test_table4_constants():
    """All ones; each layer's channel mean; the HS initialisation (a fresh HS model's scales, by depth)."""
    from backbones import build_classifier
    from backbones.repopt import ablated_scales
    searched = scales_of(randomize_scales(build_classifier("repvgg_a0", "hs", num_classes=4)))
    ones = ablated_scales(searched, "ones")
    means = ablated_scales(searched, "channel_mean")
    for s, o, m in zip(searched, ones, means):
        assert torch.all(o.conv == 1) and torch.all(o.one == 1) and (o.identity is None) == (s.identity is None)
        assert torch.allclose(m.conv, s.conv.mean().expand_as(s.conv)) and len(set(m.one.tolist())) == 1
    initial = scales_of(build_classifier("repvgg_a0", "hs", num_classes=4))
    stage3 = [float(s.conv[0]) for s in initial[7:21]]  # the 14 layers of A0's third stage, code init
    assert stage3[:3] == [1.0, pytest.approx(math.sqrt(2)), 1.0] and stage3[-1] == pytest.approx(math.sqrt(2 / 13))
    with pytest.raises(ValueError, match="ablation"):
        ablated_scales(searched, "twos")
