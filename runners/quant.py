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
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batches = list(calibration)
    if not batches:
        raise ValueError("quantization needs calibration images")
    seen = sum(len(b) for b in batches)
    if seen != setting.calibration_images:
        raise ValueError(f"{seen} calibration images given, the setting says {setting.calibration_images}")
    model = model.eval()
    with torch.no_grad():
        graph = torch.export.export(model, (batches[0][:1],), dynamic_shapes=None).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(_config())
    if setting.first_last_float:
        for name in first_and_last(model):
            quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in batches:
            for image in batch.split(1):  # the graph was exported at batch 1
                prepared(image)
    return convert_pt2e(prepared)


def int8_forward(qmodel: nn.Module, x: Tensor) -> Tensor:
    """``qmodel`` (exported at batch 1) on a batch."""
    with torch.no_grad():
        return torch.cat([qmodel(image) for image in x.split(1)])


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

QUANT_METRICS = ("top1_ptq", "kernel_std", "kernel_std_central", "kernel_std_surrounding")


def default_kernel_form(rep: str) -> str:
    """The form Table 8 reads a model's sampled kernel in: RepVGG's deployed kernel, a RepOpt-VGG target's own."""
    return "raw" if rep == "repopt" else "deployed"


def measure_trained(model: nn.Module, config: dict, recipe, data_root, device: str = "cpu", float_top1: bool = False
                    ) -> list:
    """The quantization metrics ``config["metrics"]`` asks of the trained (train-form) ``model``, as MetricRecords:
    the sampled kernel's std in the row's form (``kernel_form``), and the PTQ INT8 top-1 of the deployed model on the
    recipe's validation set (calibrated on ``recipe.calibration_images`` training images drawn with the run's
    seed), with ``float_top1`` the deployed float model's top-1 on the same images too. ``model`` is not changed."""
    import copy

    from torch.utils.data import DataLoader, Subset

    from backbones import deploy
    from results import MetricRecord
    from .data import build_datasets

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
    if "top1_ptq" in wanted:
        train_set, val_set = build_datasets(recipe.dataset, data_root, recipe.resolution, recipe.eval_crop,
                                            recipe.eval_resolution)
        if recipe.max_iters is not None:  # smoke: as the training run's own validation, a couple of batches
            val_set = Subset(val_set, range(min(len(val_set), 2 * recipe.batch)))
        n = min(recipe.calibration_images, len(train_set))
        picked = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config["seed"]))[:n]
        calibration = [x for x, _ in DataLoader(Subset(train_set, picked.tolist()), batch_size=32)]
        deployed = deploy(copy.deepcopy(model).to("cpu").eval())
        setting = QuantSetting(calibration_images=n)
        context = dict(device="cpu", dtype="int8", batch=64, resolution=recipe.test_resolution)
        with torch.no_grad():
            finite = all(bool(torch.isfinite(deployed(x)).all()) for x in calibration)
        if not finite:  # a diverged model: nothing to calibrate on; the number says so rather than failing the run
            return records + [MetricRecord("top1_ptq", float("nan"), "%", method="not quantized: the deployed float "
                                           "model's outputs on the calibration images are not finite", **context)]
        qmodel = quantize_ptq(deployed, calibration, setting)
        hits = total = float_hits = 0
        for x, y in DataLoader(val_set, batch_size=64):
            hits += int((int8_forward(qmodel, x).argmax(1) == y).sum())
            if float_top1:
                with torch.no_grad():
                    float_hits += int((deployed(x).argmax(1) == y).sum())
            total += len(y)
        where = (f"on {total} {recipe.dataset} val images; " + ", ".join(f"{k} {v}" for k, v in
                 setting.as_dict().items()))
        records.append(MetricRecord("top1_ptq", 100 * hits / total, "%", method=f"INT8 PTQ top-1 {where}", **context))
        if float_top1:
            records.append(MetricRecord("top1", 100 * float_hits / total, "%", method=f"float top-1 of the deployed "
                                        f"model {where.split(';')[0]}", **{**context, "dtype": "float32"}))
    return records
