"""The INT8 protocol and the kernel statistics (runners/quant.py): a deployed plain model quantized through torchao's
PT2E flow stays within a stated bound of the float model and is really quantized; the settings that produced it are
a record; Tables 8 / 11's standard deviations by position, of the kernel forms of RepVGG's and RepOpt-VGG's sampled
layer."""

import numpy as np
import pytest
import torch

from backbones import build_classifier, deploy
from backbones.blocks import RepVGGBlock
from backbones.repopt import RepOptConvBN
from conftest import randomize
from runners.quant import (QATSetting, QuantSetting, int8_forward, kernel_forms, kernel_std, qat_finetune,
                           quantize_ptq, sampled_layer)


def test_kernel_std_by_position():
    """Against a route that shares nothing with the implementation: numpy's std (ddof 1) of values picked by
    explicit loops over the positions."""
    kernel = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    kernel[:, :, 1, 1] *= 4  # the centre spread wider, as after RepVGG's branch addition
    values = kernel.numpy()
    central = [values[o, i, 1, 1] for o in range(5) for i in range(4)]
    surrounding = [values[o, i, r, c] for o in range(5) for i in range(4) for r in range(3) for c in range(3)
                   if (r, c) != (1, 1)]
    stats = kernel_std(kernel)
    assert stats["kernel_std"] == pytest.approx(np.std(values.ravel(), ddof=1), rel=1e-6)
    assert stats["kernel_std_central"] == pytest.approx(np.std(central, ddof=1), rel=1e-6)
    assert stats["kernel_std_surrounding"] == pytest.approx(np.std(surrounding, ddof=1), rel=1e-6)
    assert stats["kernel_std_central"] > 2 * stats["kernel_std_surrounding"]
    with pytest.raises(ValueError, match="3x3"):
        kernel_std(torch.zeros(2, 2, 1, 1))


def test_the_sampled_layer_and_its_kernel_forms():
    """RepOptimizers samples the 8th layer of B1's 16-layer stage. A RepVGG block's forms: its 3x3 branch, that
    branch with its BN folded (gamma / sqrt(var + eps) per output channel, by hand), and the deployed kernel (what
    deploy() puts in the conv); a RepOpt-VGG target's: the kernel it trains and that kernel with its BN folded."""
    repvgg = randomize(build_classifier("repoptvgg_b1", "repvgg", num_classes=10))
    block = sampled_layer(repvgg)
    assert isinstance(block, RepVGGBlock) and block is [m for m in repvgg.stage3.children() if isinstance(m, RepVGGBlock)][7]
    forms = kernel_forms(block)
    bn = block.norms["origin"]
    by_hand = block.branches["origin"].weight * (bn.weight / (bn.running_var + bn.eps).sqrt()).reshape(-1, 1, 1, 1)
    assert torch.allclose(forms["bn_fused"], by_hand) and torch.equal(forms["raw"], block.branches["origin"].weight)
    deployed = deploy(repvgg.eval())
    assert torch.allclose(forms["deployed"], sampled_layer(deployed).weight, atol=1e-6)
    # the central positions take the 1x1 and identity branches: their spread grows, the surrounding ones' does not
    after, before = kernel_std(forms["deployed"]), kernel_std(forms["bn_fused"])
    assert after["kernel_std_surrounding"] == pytest.approx(before["kernel_std_surrounding"], rel=1e-5)
    assert after["kernel_std_central"] != pytest.approx(before["kernel_std_central"], rel=1e-3)
    repopt = randomize(build_classifier("repoptvgg_b1", "repopt", num_classes=10))
    target = sampled_layer(repopt)
    assert isinstance(target, RepOptConvBN) and set(kernel_forms(target)) == {"raw", "bn_fused"}
    with pytest.raises(TypeError):
        kernel_forms(torch.nn.Conv2d(2, 2, 3))


def plain_net() -> torch.nn.Sequential:
    """A small plain conv net (what a re-parameterized model deploys to: convs with bias, ReLUs, a linear head)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 10)).eval()


def test_int8_outputs_stay_near_the_float_model_and_the_settings_are_recorded():
    """A plain model through PT2E with the x86 quantizer, calibrated on 32 random images: on other random images its
    INT8 logits are within 2% (relative L2) of the float logits, and not equal to them. The setting says how many
    images calibrated, which quantizer and which observers; a calibration set of another size is refused."""
    model = plain_net()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    x = torch.randn(6, 3, 32, 32, generator=g)
    with torch.no_grad():
        reference = model(x)
    setting = QuantSetting(calibration_images=32)
    out = int8_forward(quantize_ptq(model, calibration, setting), x)
    error = float((out - reference).norm() / reference.norm())
    assert 0 < error <= 0.02
    record = setting.as_dict()
    assert record["calibration_images"] == 32 and "X86InductorQuantizer" in record["quantizer"]
    assert record["observers"] == "activations HistogramObserver, weights PerChannelMinMaxObserver"
    assert record["deployed_first"] and record["weights"] == "int8 per_channel_symmetric"
    assert record["activations"] == "uint8 per_tensor_affine" and record["torchao"]
    with pytest.raises(ValueError, match="32 calibration images given"):
        quantize_ptq(model, calibration, QuantSetting(calibration_images=16))


def test_a_deployed_repvgg_is_quantized_layer_by_layer_and_first_last_can_stay_float():
    """A deployed RepVGG-A0: every conv and the linear layer get INT8 weights (one per-channel weight dequantize
    each in the reference graph); with ``first_last_float`` the first conv and the last linear keep float weights."""
    model = deploy(build_classifier("repvgg_a0", "repvgg", num_classes=10).eval())
    calibration = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))]

    def weight_dequantizes(graph_module):
        return sum("dequantize_per_channel" in str(n.target) for n in graph_module.graph.nodes)

    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert layers == 23  # 22 convs and the classifier
    assert weight_dequantizes(quantize_ptq(model, calibration, QuantSetting(calibration_images=4))) == layers
    kept = quantize_ptq(model, calibration, QuantSetting(calibration_images=4, first_last_float=True))
    assert weight_dequantizes(kept) == layers - 2


@pytest.mark.parametrize("arch,rep", [("resnet18", "orepa"), ("repnext_t", "repnext")])
def test_the_same_call_quantizes_every_method_s_deployed_model(arch, rep):
    """One protocol for every method (RepVGG and plain nets above): the deployed OREPA ResNet-18 (whose blocks call
    one ReLU twice, as torchvision's do: the x86 quantizer's fusion patterns refused that until each call got a
    partition of its own) and RepNeXt (depthwise convs; LayerNorm stays float) — every conv and linear layer gets INT8 weights, and the INT8
    logits stay near the float ones (within 10%, relative L2: random weights, 4 calibration images)."""
    torch.manual_seed(0)
    model = deploy(randomize(build_classifier(arch, rep, num_classes=10)).eval())
    g = torch.Generator().manual_seed(4)
    qmodel = quantize_ptq(model, [torch.randn(4, 3, 32, 32, generator=g)], QuantSetting(calibration_images=4))
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert sum("dequantize_per_channel" in str(n.target) for n in qmodel.graph.nodes) == layers
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        reference = model(x)
    assert 0 < float((int8_forward(qmodel, x) - reference).norm() / reference.norm()) <= 0.10


@pytest.mark.parametrize("rep,convs", [("repopt", 22), ("repvgg", 44)])
def test_qat_quantizes_every_conv_of_the_training_form_and_starts_at_the_float_model(rep, convs):
    """QAT (Table 10) of a RepVGG-A0-shaped model in its training form, every parameter and BN statistic
    randomised: every conv gets fake-quantized INT8 weights — a RepOpt-VGG's 22 convs, and a RepVGG's 3x3 and 1x1
    branches (44), which the x86 quantizer's own fusion patterns would leave in float — plus the classifier. At lr 0
    with BN statistics frozen from the first step the INT8 model differs from the float model only by quantization
    (within 5%, relative L2, not 0: every branch's input and weights are rounded on their own); the recipe is a
    record."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = randomize(build_classifier("repvgg_a0", rep, num_classes=10)).eval()
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    setting = QATSetting(epochs=1, batch=8, lr=0.0, freeze_bn_after=0.0)
    qmodel = qat_finetune(model, data, setting)
    weights = sum("dequantize_per_channel" in str(n.target) for n in qmodel.graph.nodes)
    assert weights == convs + 1
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        reference = model(x)
    error = float((int8_forward(qmodel, x) - reference).norm() / reference.norm())
    assert 0 < error <= 0.05
    record = setting.as_dict()
    assert record["lr"] == 0.0 and record["epochs"] == 1 and record["freeze_observers_after"] == 5 / 8
    assert "is_qat=True" in record["quantizer"] and record["optimizer"] == "torch.optim.SGD"


def test_tables_8_10_11_measure_the_same_two_trained_models(tmp_path):
    """repopt.table11 at smoke plans Table 8's RepVGG-B1 and RepOpt-VGG-B1 runs (and the latter's Hyper-Search)
    first, then measures their final weights (sha256-checked, recorded as each row's input): the RepVGG kernel in
    three forms, where branch addition leaves the surrounding positions exactly as BN fusion made them and the
    deployed form is the kernel Table 8's run measured itself. repopt.table10 then trains nothing: it measures the
    same runs' float and INT8 top-1. The reports judge Table 11's orderings and show Table 10's printed N/A."""
    import sqlite3

    from test_cli import run_cli
    db = tmp_path / "db.sqlite"
    where = ("--db", f"sqlite:///{db}", "--data-root", str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"))
    done = run_cli("repopt.table11", *where, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    def values(table):
        with sqlite3.connect(db) as c:
            return {(r, m): v for r, m, v in c.execute(
                "SELECT r.row_name, m.name, m.value FROM metrics m JOIN runs r ON m.run_id = r.id "
                "WHERE r.table_name = ?", (table,))}

    t8, t11 = values("repopt.table8"), values("repopt.table11")
    raw, fused, added = (t11[f"RepVGG-B1 / {k}", "kernel_std_surrounding"] for k in (
        "3x3 kernel before fusing BN", "after fusing BN", "after branch addition"))
    assert added == pytest.approx(fused, rel=1e-9) and raw != pytest.approx(fused, rel=1e-6)
    assert t11["RepVGG-B1 / after branch addition", "kernel_std"] == pytest.approx(t8["RepVGG-B1", "kernel_std"])
    assert t11["RepOpt-VGG-B1 / 3x3 kernel", "kernel_std"] == pytest.approx(t8["RepOpt-VGG-B1", "kernel_std"])
    with sqlite3.connect(db) as c:
        weights = dict(c.execute("SELECT r.row_name, a.sha256 FROM artifacts a JOIN runs r ON a.run_id = r.id "
                                 "WHERE a.kind = 'weights_train' AND r.table_name = 'repopt.table8'"))
        inputs = c.execute("SELECT r.row_name, a.sha256 FROM artifacts a JOIN runs r ON a.run_id = r.id "
                           "WHERE a.kind = 'input_weights' AND r.table_name = 'repopt.table11'").fetchall()
    assert sorted(inputs) == sorted([(f"RepVGG-B1 / {k}", weights["RepVGG-B1"]) for k in (
        "3x3 kernel before fusing BN", "after fusing BN", "after branch addition")]
        + [("RepOpt-VGG-B1 / 3x3 kernel", weights["RepOpt-VGG-B1"])])

    done = run_cli("repopt.table10", *where, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM runs WHERE table_name = 'repopt.table8'").fetchone() == (2,)
    t10 = values("repopt.table10")
    for row in ("RepOpt-VGG-B1", "RepVGG-1"):
        assert 0 <= t10[row, "top1_ptq"] <= 100 and 0 <= t10[row, "top1"] <= 100
    qat = "RepVGG-B1, QAT of the training form (ours)"
    assert 0 <= t10["RepOpt-VGG-B1", "top1_qat"] <= 100 and 0 <= t10[qat, "top1_qat"] <= 100
    assert ("RepVGG-1", "top1_qat") not in t10  # N/A, as printed
    for table in ("table10", "table11"):
        assert run_cli("report", f"repopt.{table}", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"),
                       cwd=tmp_path).returncode == 0
    md = (tmp_path / "out" / "repopt.table11.md").read_text()
    assert "RepVGG-B1's kernel std through the conversions" in md and "| 0.0131 |" in md
    line = next(line for line in md.splitlines() if line.startswith("| RepVGG-B1 / after branch addition | finished"))
    assert f"| 0.0236 | {t11['RepVGG-B1 / after branch addition', 'kernel_std']:.4f} |" in line
    assert md.count("held") >= 3  # every neighbouring pair judged ("held" or "did not hold")
    with sqlite3.connect(db) as c:  # Figures 3 and 5: each measured kernel's distribution, a share per bin
        shares = c.execute("SELECT r.row_name, m.name, count(*), sum(m.value) FROM metrics m JOIN runs r ON "
                           "m.run_id = r.id WHERE r.table_name = 'repopt.table11' AND m.name LIKE 'kernel_hist_%' "
                           "AND m.name != 'kernel_hist_range' GROUP BY r.row_name, m.name").fetchall()
    assert len(shares) == 4 * 3 and all(n == 60 and total == pytest.approx(1.0) for _, _, n, total in shares)
    assert run_cli("report", "repopt.table11", "--format", "html", "--db", f"sqlite:///{db}", "--out",
                   str(tmp_path / "out"), cwd=tmp_path).returncode == 0
    assert 'alt="kernel histograms of repopt.table11 at smoke"' in (tmp_path / "out" / "repopt.table11.html").read_text()
    md = (tmp_path / "out" / "repopt.table10.md").read_text()
    assert "N/A" in md and f"| {qat} | finished |" in md
