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
