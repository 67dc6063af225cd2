"""repbench backbones in the OpenMMLab registry (scope ``repbench``), for MMDetection / MMSegmentation configs:

    custom_imports = dict(imports=["backbones"], allow_failed_imports=False)
    model = dict(backbone=dict(_delete_=True, type="repbench.ResNet", depth=50, rep="orepa", out_indices=(0, 1, 2, 3)))

Pretrained weights are loaded by the backbone itself, strictly (``backbones.load_checkpoint``), never through
mmengine's ``Pretrained`` init, which loads with ``strict=False``. A classification checkpoint's ``fc`` head is the
only thing dropped; a deploy-form checkpoint deploys the backbone first.
"""

from __future__ import annotations

import os

from mmengine.model import BaseModule
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_CONSTRUCTORS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import Registry
from torch import nn

from .deploy import CheckpointError, deploy, infer_form, load_state, read_checkpoint
from .networks import build_classifier
from .repopt import RepOptimizerAdamW, RepOptimizerSGD, checked_mults, grad_mults

MODELS = Registry("model", parent=MMENGINE_MODELS, scope="repbench", locations=["backbones"])


class _RepBackbone(BaseModule):
    """Shared behaviour: out_indices, frozen stages, norm_eval, strict pretrained loading, switch_to_deploy."""

    def _setup(self, net: nn.Module, out_indices, frozen_stages: int, norm_eval: bool, pretrained: str | None):
        self.net = net
        self.out_indices = tuple(out_indices)
        if not set(self.out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"out_indices must be within 0..3, got {out_indices}")
        self.frozen_stages, self.norm_eval, self.pretrained = frozen_stages, norm_eval, pretrained
        self.out_channels = [net.out_channels[i] for i in self.out_indices]
        if pretrained is not None:
            if not isinstance(pretrained, (str, os.PathLike)) or not os.path.isfile(pretrained):
                raise CheckpointError(f"pretrained checkpoint {pretrained!r} is not a local file (repbench "
                                      "backbones load their weights themselves, strictly)")
            self._load_pretrained(pretrained)
        self._freeze_stages()

    def _load_pretrained(self, path) -> None:
        ckpt = read_checkpoint(path)
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("fc.")}
        if (ckpt["form"] or infer_form(ckpt["state_dict"])) == "deploy":
            deploy(self.net)
        load_state(self.net, ckpt, str(path))

    def _freeze_stages(self):
        stages = [self.net.stem, *self.net.stages()]
        for stage in stages[: self.frozen_stages + 1] if self.frozen_stages >= 0 else []:
            stage.eval()
            for p in stage.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def init_weights(self):
        if self.pretrained is None:
            super().init_weights()

    def forward(self, x):
        outs = self.net.forward_features(x)
        return tuple(outs[i] for i in self.out_indices)

    def switch_to_deploy(self):
        deploy(self.net)
        return self


@MODELS.register_module()
class ResNet(_RepBackbone):
    """A repbench ResNet (``depth`` 18/34/50/101, or ``arch`` e.g. ``resnext50_32x4d``) with any ``rep``.
    ``strides``/``dilations`` per stage give the dilated D8 form (e.g. (1, 2, 1, 1) / (1, 1, 2, 4))."""

    def __init__(self, depth: int = 50, rep: str = "none", variant=None, arch: str | None = None,
                 out_indices=(0, 1, 2, 3), strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), frozen_stages: int = -1,
                 norm_eval: bool = False, pretrained: str | None = None, init_cfg=None):
        super().__init__(init_cfg)
        arch = arch or f"resnet{depth}"
        net = build_classifier(arch, rep, num_classes=0, variant=variant, strides=tuple(strides),
                               dilations=tuple(dilations))
        self._setup(net, out_indices, frozen_stages, norm_eval, pretrained)


@MODELS.register_module()
class RepVGG(_RepBackbone):
    """A repbench RepVGG (``arch`` e.g. ``repvgg_a0``) with ``rep`` none / repvgg / orepa_vgg."""

    def __init__(self, arch: str = "repvgg_a0", rep: str = "repvgg", variant=None, out_indices=(0, 1, 2, 3),
                 frozen_stages: int = -1, norm_eval: bool = False, pretrained: str | None = None, init_cfg=None):
        super().__init__(init_cfg)
        self._setup(build_classifier(arch, rep, num_classes=0, variant=variant), out_indices, frozen_stages,
                    norm_eval, pretrained)



# -- RepOptimizers through MMEngine's optimizer registry -------------------------------------------------------------
# optim_wrapper = dict(constructor="repbench.RepOptimizerConstructor",
#                      optimizer=dict(type="repbench.RepOptimizerSGD", lr=0.1, momentum=0.9, nesterov=True,
#                                     weight_decay=4e-5))
# The constructor hands the optimizer the Grad Mults of the model's RepOpt blocks (backbones.repopt.reinitialize
# sets their constants); gradient clipping is refused (it breaks CSLA = GR).
OPTIMIZERS = Registry("optimizer", parent=MMENGINE_OPTIMIZERS, scope="repbench", locations=["backbones"])
OPTIM_WRAPPER_CONSTRUCTORS = Registry("optimizer wrapper constructor", parent=MMENGINE_CONSTRUCTORS,
                                      scope="repbench", locations=["backbones"])
OPTIMIZERS.register_module(module=RepOptimizerSGD)
OPTIMIZERS.register_module(module=RepOptimizerAdamW)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class RepOptimizerConstructor(DefaultOptimWrapperConstructor):
    """MMEngine's default constructor (param groups, paramwise rules), then the Grad Mults of the model's RepOpt
    blocks at the optimizer's power."""

    def __call__(self, model: nn.Module):
        if self.optim_wrapper_cfg.get("clip_grad"):
            raise ValueError("gradient clipping breaks the RepOptimizer's equivalence with CSLA; remove clip_grad")
        wrapper = super().__call__(model)
        optimizer = wrapper.optimizer
        if not isinstance(optimizer, (RepOptimizerSGD, RepOptimizerAdamW)):
            raise TypeError(f"RepOptimizerConstructor builds RepOptimizers, not {type(optimizer).__name__}")
        optimizer.grad_mults = checked_mults(grad_mults(getattr(model, "module", model), optimizer.power))
        return wrapper
