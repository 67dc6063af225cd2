"""INT8 post-training quantization of a deployed model, and the kernel statistics of RepOptimizers Tables 8 and 11.

The protocol (every setting recorded with the numbers it produced, :meth:`QuantSetting.as_dict`):

* the model is **deployed first** (``backbones.deploy``) and put in eval mode: quantization sees the inference
  structure every method ends in (a plain conv net for RepVGG, RepOpt-VGG, OREPA, DBB; RepNeXt's rRep form);
* torchao's PT2E flow, the maintained PyTorch path (the ecosystem notes, Sec. 6): ``torch.export``, then
  ``X86InductorQuantizer`` with its default config — weights INT8 per-channel symmetric, activations INT8
  per-tensor affine, the config's own observers (HistogramObserver for activations, PerChannelMinMaxObserver for
  weights; what the config says is recorded, read from it) — ``prepare_pt2e``, calibration on ``calibration_images`` training images (a seeded
  choice), ``convert_pt2e``: the reference INT8 model (quantize / dequantize around float ops; what its accuracy is
  measured on, the same on any device);
* ``first_last_float``: the first conv and the last linear layer stay in float (the RepVGG issues show it matters).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class QuantSetting:
    calibration_images: int = 256      # training images the observers see (seeded choice)
    calibration_transform: str = "the training transforms"  # how those images are read (as the training run)
    first_last_float: bool = False     # the first conv and the last linear layer left in float
    quantizer: str = "torchao X86InductorQuantizer (PT2E), default config"

    def as_dict(self) -> dict:
        """The setting and what the quantizer's config does, read from it (not restated): weight and activation
        schemes, observers."""
        config = _config()
        weight, activation = config.weight, config.input_activation
        return {**asdict(self), "torchao": _version("torchao"), "deployed_first": True,
                "weights": f"{weight.dtype} {weight.qscheme}".replace("torch.", ""),
                "activations": f"{activation.dtype} {activation.qscheme}".replace("torch.", ""),
                "observers": f"activations {_name(activation.observer_or_fake_quant_ctr)}, weights "
                             f"{_name(weight.observer_or_fake_quant_ctr)}"}


def _config():
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    return xiq.get_default_x86_inductor_quantization_config()


def _name(constructor) -> str:
    match = re.search(r"\.(\w+Observer)\b", repr(constructor))
    return match.group(1) if match else repr(constructor)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def first_and_last(model: nn.Module) -> tuple[str, str]:
    """The names of the model's first conv and last linear layer (kept in float by ``first_last_float``)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not convs or not linears:
        raise ValueError("first_last_float needs a model with a conv and a linear layer")
    return convs[0], linears[-1]


def quantize_ptq(model: nn.Module, calibration: Iterable[Tensor], setting: QuantSetting = QuantSetting()
                 ) -> nn.Module:
    """The reference INT8 model of a deployed ``model`` (see the module docstring), calibrated on the batches of
    ``calibration`` (together ``setting.calibration_images`` images; the caller picks them). ``model`` is not
    changed."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batches = list(calibration)
    if not batches:
        raise ValueError("quantization needs calibration images")
    seen = sum(len(b) for b in batches)
    if seen != setting.calibration_images:
        raise ValueError(f"{seen} calibration images given, the setting says {setting.calibration_images}")
    model = model.eval()
    with torch.no_grad():  # any batch size: the batch dimension exported dynamic
        graph = torch.export.export(model, (batches[0],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    _one_partition_per_call(graph)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(_config())
    if setting.first_last_float:
        for name in first_and_last(model):
            quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    qmodel = convert_pt2e(prepared)
    allow_exported_model_train_eval(qmodel)  # .eval() as on any module (the probes call it)
    return qmodel


ONE_OP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.SiLU)


def _one_partition_per_call(graph_module: nn.Module) -> None:
    """torch.export (non-strict) leaves an op's module in ``nn_module_stack``, by the module's name, so one
    activation module called at several places (a ResNet block's single ``relu``, torchvision's and this suite's)
    becomes one source partition with several outputs, which the x86 quantizer's fusion patterns refuse ("Input
    partition has more than one output node"). Such a module is one op per call: each call is renamed to a
    partition of its own."""
    names = {f"{m.__module__}.{m.__qualname__}" for m in ONE_OP_MODULES}
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (fqn, cls) = list(stack.items())[-1]
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        if name in names:
            node.meta["nn_module_stack"] = {**stack, key: (f"{fqn}@{node.name}", cls)}


def int8_forward(qmodel: nn.Module, x: Tensor) -> Tensor:
    """The INT8 model's logits for a batch."""
    with torch.no_grad():
        return qmodel(x)


def probe_int8_latency(deployed: nn.Module, qmodel: nn.Module, resolution: int, batch: int = 1, warmup: int = 2,
                       steps: int = 5) -> dict:
    """Latency of the INT8 model beside the float model it came from, on the same execution path: both through
    ``torch.compile`` (inductor, weights frozen as constants — what lowers the quantize / dequantize pattern to
    INT8 kernels on x86), the same threads, forwards interleaved by the inference probe. Returns Measurements
    ``latency_int8``, ``latency_compiled_fp32`` and their paired ratio ``latency_int8_ratio`` (INT8 / float);
    where compiling is impossible here (no C++ compiler), none, and the reason (``"error"``)."""
    import torch._inductor.config as inductor_config

    from .probes import paired_ratio, probe_inference_interleaved

    try:
        with inductor_config.patch(freezing=True):
            models = {"int8": torch.compile(qmodel), "fp32": torch.compile(deployed)}
            timed = probe_inference_interleaved(models, resolution, "cpu", latency_batch=batch,
                                                throughput_batch=None, warmup=max(warmup, 1), steps=steps)
    except Exception as e:  # inductor needs a working C++ toolchain; the accuracy column does not
        return {"error": f"not measured: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"}
    int8, fp32 = timed["int8"][0], timed["fp32"][0]
    path = "both torch.compile (inductor, freezing), eager forward of neither"
    for m, name in ((int8, "latency_int8"), (fp32, "latency_compiled_fp32")):  # the spread: <name>_std
        m.name, m.extra = name, {k.replace("latency", name, 1): v for k, v in m.extra.items()}
    int8.method, fp32.method = (f"{m.method}; {path}" for m in (int8, fp32))
    ratio = paired_ratio("latency_int8_ratio", int8, fp32, "the float model (compiled)")
    ratio.method += f"; {path}"
    return {m.name: m for m in (int8, fp32, ratio)}


# -- QAT (Table 10): finetuning with fake quantization, then the INT8 model ------------------------------------------

@dataclass(frozen=True)
class QATSetting:
    """Quantization-aware finetuning as the paper's footnote points (PyTorch's QAT example): plain SGD at lr 1e-4
    (no momentum, no weight decay), BN statistics frozen after 4 and observers after 5 of its 8 epochs — kept here
    as fractions of the schedule — on the paper's 10 epochs (Appendix C, "after only 10-epoch finetuning"). The
    model trains in its training form with the quantizer's QAT config (fake-quantized weights and activations, each
    conv's BN folded in the simulation), then becomes the INT8 model. ``max_iters`` caps the steps (smoke)."""

    epochs: float = 10.0
    lr: float = 1e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    freeze_bn_after: float = 4 / 8      # fraction of the steps after which BN uses (and keeps) its running statistics
    freeze_observers_after: float = 5 / 8  # ... after which the quantization ranges stop moving
    batch: int = 64
    max_iters: int | None = None
    quantizer: str = "torchao X86InductorQuantizer (PT2E), default config with is_qat=True"

    def as_dict(self) -> dict:
        return {**asdict(self), "torchao": _version("torchao"), "optimizer": "torch.optim.SGD"}


def _every_conv_qat():
    """X86InductorQuantizer for QAT, plus: every conv its fusion patterns leave out gets the same config's input and
    weight specs. Its patterns match conv-BN(-ReLU) and conv-BN-add with one extra input; a RepVGG training block
    (conv-BN + conv-BN + BN, summed) matches none, and would keep float convs. The sums stay float, as the branches'
    outputs are (an INT8 conv's output is dequantized)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    class EveryConv(xiq.X86InductorQuantizer):
        def annotate(self, model):
            model = super().annotate(model)
            config = xiq.get_default_x86_inductor_quantization_config(is_qat=True)
            for node in model.graph.nodes:
                if node.target != torch.ops.aten.conv2d.default or "quantization_annotation" in node.meta:
                    continue
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: config.input_activation, node.args[1]: config.weight},
                    _annotated=True)
            return model

    return EveryConv()


def _freeze_bn_statistics(prepared: nn.Module) -> None:
    """BN in an exported training graph (``aten.batch_norm``, argument 5: training) switched to its running
    statistics, which stop updating (PyTorch's PT2E QAT recipe; the eager API's ``freeze_bn_stats``)."""
    for node in prepared.graph.nodes:
        if node.target == torch.ops.aten.batch_norm.default:
            args = list(node.args)
            args[5] = False
            node.args = tuple(args)
    prepared.recompile()


def qat_finetune(model: nn.Module, train_set, setting: QATSetting, seed: int = 0, device: str = "cpu",
                 log=None) -> nn.Module:
    """The INT8 model after quantization-aware finetuning of ``model`` in its training form (a copy; ``model`` is
    not changed) on ``train_set`` (see :class:`QATSetting`)."""
    import copy

    from torch.utils.data import DataLoader, RandomSampler
    from torchao.quantization.pt2e import (allow_exported_model_train_eval, disable_observer,
                                           move_exported_model_to_eval)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    generator = torch.Generator().manual_seed(seed)
    steps = max(1, round(setting.epochs * len(train_set) / setting.batch))
    steps = min(steps, setting.max_iters) if setting.max_iters else steps
    loader = DataLoader(train_set, batch_size=setting.batch, drop_last=len(train_set) >= setting.batch,
                        sampler=RandomSampler(train_set, replacement=True, num_samples=steps * setting.batch,
                                              generator=generator))
    model = copy.deepcopy(model).to(device).train()
    first, _ = next(iter(loader))
    graph = torch.export.export(model, (first.to(device),), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    _one_partition_per_call(graph)
    quantizer = _every_conv_qat()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(graph, quantizer)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=setting.lr, momentum=setting.momentum,
                                weight_decay=setting.weight_decay)
    for step, (x, y) in enumerate(loader):
        if step == int(setting.freeze_bn_after * steps):
            _freeze_bn_statistics(prepared)
        if step == max(1, int(setting.freeze_observers_after * steps)):  # after the ranges saw a step at least
            prepared.apply(disable_observer)
        loss = nn.functional.cross_entropy(prepared(x.to(device)), y.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"QAT loss {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"QAT step {step + 1}/{steps}: loss {loss.item():.4f}")
    move_exported_model_to_eval(prepared)
    qmodel = convert_pt2e(prepared.to("cpu"))
    allow_exported_model_train_eval(qmodel)
    return qmodel


# -- Tables 8 and 11: the standard deviation of one 3x3 kernel in its forms ---------------------------------------------

def kernel_std(kernel: Tensor) -> dict[str, float]:
    """Std (unbiased) of a 3x3 kernel's parameters: all, the centre positions, the eight surrounding positions."""
    if kernel.shape[-2:] != (3, 3):
        raise ValueError(f"a 3x3 kernel, not {tuple(kernel.shape)}")
    k = kernel.detach().double()
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    return {"kernel_std": float(k.std()), "kernel_std_central": float(k[..., 1, 1].std()),
            "kernel_std_surrounding": float(k[..., mask].std())}


HISTOGRAM_BINS = 60


def kernel_histograms(kernel: Tensor, bins: int = HISTOGRAM_BINS) -> list[tuple[str, int, float, str]]:
    """The parameter distributions RepOptimizers Figures 3 and 5 draw, as stored series (name, step, value, how):
    for the positions ``all``, ``central`` and ``surrounding`` of a 3x3 kernel, the share of its parameters in each
    of ``bins`` equal bins over [-m, m] (m: the kernel's largest magnitude), bin i at step i of
    ``kernel_hist_<positions>``; and ``kernel_hist_range`` = m."""
    k = kernel.detach().double()
    m = float(k.abs().max()) or 1.0
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    out = [("kernel_hist_range", 0, m, "the histograms' range [-m, m], m = the largest |w|")]
    for position, values in (("all", k.flatten()), ("central", k[..., 1, 1].flatten()),
                             ("surrounding", k[..., mask].flatten())):
        shares = torch.histc(values, bins=bins, min=-m, max=m) / values.numel()
        out += [(f"kernel_hist_{position}", i, share, f"share of the {position} positions' {values.numel()} "
                 f"parameters in bin {i} of {bins} over [-{m:.4g}, {m:.4g}]") for i, share in enumerate(shares.tolist())]
    return out


def sampled_layer(model: nn.Module, stage_depth: int = 16, index: int = 7) -> nn.Module:
    """The layer RepOptimizers samples: the 8th 3x3 layer (``index`` 7) of the 16-layer stage (B1, B2: stage 3)."""
    def layers(stage):  # the stage's blocks (or, deployed, convs): its children with parameters, not the ReLUs
        return [m for m in stage.children() if any(True for _ in m.parameters())]

    stages = [layers(s) for s in model.stages() if len(layers(s)) == stage_depth]
    if not stages:
        raise ValueError(f"the model has no {stage_depth}-layer stage")
    return stages[0][index]


KERNEL_FORMS = ("raw", "bn_fused", "deployed")  # Table 11's rows: before fusing BN, after fusing BN, after addition


def kernel_forms(block: nn.Module) -> dict[str, Tensor]:
    """The sampled block's 3x3 kernel in each form it has: a RepVGG training block: ``raw`` (its 3x3 branch),
    ``bn_fused`` (that branch with its BN folded in), ``deployed`` (every branch added: the inference kernel);
    a RepOpt-VGG target (conv + BN): ``raw`` (the kernel it trains, as Table 11 reads it: no BN fusion, no
    addition) and ``bn_fused``."""
    from backbones.algebra import fuse_conv_bn
    from backbones.blocks import RepVGGBlock
    from backbones.repopt import RepOptConvBN

    if isinstance(block, RepVGGBlock):
        if block.form != "offline_bn":
            raise ValueError("kernel forms are those of RepVGG's own block (a BN per branch)")
        raw = block.branches["origin"].weight
        return {"raw": raw, "bn_fused": fuse_conv_bn(raw, block.norms["origin"])[0],
                "deployed": block.equivalent_kernel_bias()[0]}
    if isinstance(block, RepOptConvBN):
        return {"raw": block.conv.weight, "bn_fused": block.equivalent_kernel_bias()[0]}
    raise TypeError(f"no kernel forms for {type(block).__name__}")


# -- in a run: what a quantization table asks of a trained model --------------------------------------------------------

KERNEL_METRICS = ("kernel_std", "kernel_std_central", "kernel_std_surrounding")
# the quantization column any classification table can ask for (run_suite TABLE --quantize): INT8 top-1 and its
# drop from the deployed float model on the same images, INT8 latency beside the float model's on this CPU
QUANT_COLUMN = ("top1_ptq", "top1_ptq_drop", "latency_int8")
QUANT_METRICS = ("top1_ptq", "top1_ptq_drop", "latency_int8", *KERNEL_METRICS)


def default_kernel_form(rep: str) -> str:
    """The form Table 8 reads a model's sampled kernel in: RepVGG's deployed kernel, a RepOpt-VGG target's own."""
    return "raw" if rep == "repopt" else "deployed"


def measure_trained(model: nn.Module, config: dict, recipe, data_root, device: str = "cpu", float_top1: bool = False
                    ) -> list:
    """The quantization metrics ``config["metrics"]`` asks of the trained (train-form) ``model``, as MetricRecords:
    the sampled kernel's std in the row's form (``kernel_form``), and the PTQ INT8 top-1 of the deployed model on the
    recipe's validation set (calibrated on ``recipe.calibration_images`` training images drawn with the run's
    seed), with ``float_top1`` the deployed float model's top-1 on the same images too; the quantization column's
    drop and INT8 latency (QUANT_COLUMN). ``model`` is not changed."""
    from results import MetricRecord

    wanted = set(config["metrics"])
    records = []
    if wanted & {"kernel_std", "kernel_std_central", "kernel_std_surrounding"}:
        form = config.get("kernel_form") or default_kernel_form(config["rep"])
        forms = kernel_forms(sampled_layer(model))
        if form not in forms:
            raise ValueError(f"the sampled layer of a {config['rep']} model has no {form!r} kernel form")
        how = (f"std (unbiased) of the 8th 3x3 layer of the 16-layer stage, its kernel {form} "
               f"({tuple(forms[form].shape)})")
        where = {"kernel_std": "all positions", "kernel_std_central": "the centre",
                 "kernel_std_surrounding": "the eight surrounding positions"}
        records += [MetricRecord(name, value, "", method=f"{how}: {where[name]}")
                    for name, value in kernel_std(forms[form]).items() if name in wanted]
        records += [MetricRecord(name, value, "", step=step, method=f"{how}: {text}")  # Figures 3 and 5
                    for name, step, value, text in kernel_histograms(forms[form])]
    qat = "top1_qat" in wanted and config.get("qat")
    if wanted & set(QUANT_COLUMN) or qat:
        train_set, val_set = _datasets(recipe, data_root)
    if wanted & set(QUANT_COLUMN):
        records += _measure_int8(model, config, recipe, train_set, val_set, float_top1, "top1_ptq_drop" in wanted,
                                 "latency_int8" in wanted)
    if qat:
        records += _measure_qat(model, config, recipe, train_set, val_set, device)
    return records


def _datasets(recipe, data_root):
    """The recipe's (train, val) sets; at smoke, as the training run's own validation, a couple of val batches."""
    from torch.utils.data import Subset

    from .data import build_datasets
    train_set, val_set = build_datasets(recipe.dataset, data_root, recipe.resolution, recipe.eval_crop,
                                        recipe.eval_resolution)
    if recipe.max_iters is not None:
        val_set = Subset(val_set, range(min(len(val_set), 2 * recipe.batch)))
    return train_set, val_set


def _hits(forward, x: Tensor, y: Tensor) -> int:
    with torch.no_grad():
        return int((forward(x).argmax(1) == y).sum())


def _measure_qat(model: nn.Module, config: dict, recipe, train_set, val_set, device: str) -> list:
    """QAT INT8 top-1 (Table 10): the trained model finetuned in its training form (QATSetting), then INT8."""
    from torch.utils.data import DataLoader

    from results import MetricRecord
    from .probes import device_name

    setting = QATSetting(epochs=recipe.qat_epochs, batch=recipe.batch * recipe.devices, max_iters=recipe.max_iters)
    qmodel = qat_finetune(model, train_set, setting, seed=config["seed"], device=device)
    hits = total = 0
    for x, y in DataLoader(val_set, batch_size=64):
        hits, total = hits + _hits(qmodel, x, y), total + len(y)
    how = ", ".join(f"{k} {v}" for k, v in setting.as_dict().items())
    return [MetricRecord("top1_qat", 100 * hits / total, "%", device=device_name("cpu"), dtype="int8", batch=64,
                         resolution=recipe.test_resolution,
                         method=f"INT8 top-1 after QAT of the training form ({config['rep']}) on {total} "
                         f"{recipe.dataset} val images; finetuned on {device_name(device)}; {how}")]


def _measure_int8(model: nn.Module, config: dict, recipe, train_set, val_set, float_top1: bool, drop: bool,
                  latency: bool) -> list:
    """PTQ INT8 top-1 of the deployed ``model``; with ``float_top1`` the float model's top-1 on the same images (a
    ``top1`` record: for a table that trains nothing), with ``drop`` the difference of the two; with ``latency``
    the INT8 and float latency on this CPU."""
    import copy

    from torch.utils.data import DataLoader, Subset

    from backbones import deploy
    from results import MetricRecord
    from .probes import device_name

    n = min(recipe.calibration_images, len(train_set))
    picked = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config["seed"]))[:n]
    calibration = [x for x, _ in DataLoader(Subset(train_set, picked.tolist()), batch_size=32)]
    deployed = deploy(copy.deepcopy(model).to("cpu").eval())
    setting = QuantSetting(calibration_images=n)
    cpu = device_name("cpu")
    context = dict(device=cpu, dtype="int8", batch=64, resolution=recipe.test_resolution)
    with torch.no_grad():
        finite = all(bool(torch.isfinite(deployed(x)).all()) for x in calibration)
    if not finite:  # a diverged model: nothing to calibrate on; the number says so rather than failing the run
        return [MetricRecord("top1_ptq", float("nan"), "%", method="not quantized: the deployed float model's "
                             "outputs on the calibration images are not finite", **context)]
    qmodel = quantize_ptq(deployed, calibration, setting)
    hits = total = float_hits = 0
    for x, y in DataLoader(val_set, batch_size=64):
        hits += _hits(qmodel, x, y)
        float_hits += _hits(deployed, x, y) if float_top1 or drop else 0
        total += len(y)
    where = f"on {total} {recipe.dataset} val images"
    how = f"{where}; " + ", ".join(f"{k} {v}" for k, v in setting.as_dict().items())
    int8_top1, float_top1_value = 100 * hits / total, 100 * float_hits / total
    records = [MetricRecord("top1_ptq", int8_top1, "%", method=f"INT8 PTQ top-1 {how}", **context)]
    if float_top1:
        records.append(MetricRecord("top1", float_top1_value, "%", method=f"float top-1 of the deployed model "
                                    f"{where}", **{**context, "dtype": "float32"}))
    if drop:
        records += [MetricRecord("top1_ptq_drop", float_top1_value - int8_top1, "points",
                                 method=f"float top-1 of the deployed model ({float_top1_value:.2f}) - INT8 PTQ "
                                 f"top-1, {how}", **context)]
    if latency:
        timed = probe_int8_latency(deployed, qmodel, recipe.test_resolution, recipe.latency_batch,
                                   recipe.cost_warmup, recipe.cost_steps)
        if "error" in timed:
            records.append(MetricRecord("latency_int8", None, "s", method=timed["error"], device=cpu))
        for m in timed.values() if "error" not in timed else ():
            where_timed = dict(device=cpu, dtype="int8" if "int8" in m.name else "float32", batch=m.batch,
                               resolution=m.resolution, threads=m.threads)
            records.append(MetricRecord(m.name, m.value, m.unit, method=m.method, **where_timed))
            records += [MetricRecord(k, v, m.unit, method=m.method, **where_timed) for k, v in m.extra.items()]
    return records
