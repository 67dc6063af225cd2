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


FREEZE = ("paper", "fair")
STEM_LR_MULT = 0.1  # OREPA supplement: the linear deep stem trains at lr x0.1 downstream


def frozen_indices(frozen_stages, freeze: str, deep_stem: bool) -> tuple[int, ...]:
    """Which of (stem, layer1, ..., layer4) = (0, 1, ..., 4) a backbone freezes.

    ``frozen_stages``: an int as mmdet's (-1 none, k >= 0 the stem and the first k stages: the stock configs' setting),
    or the indices themselves (e.g. ``(1,)``: layer1 frozen, the stem trainable). ``freeze`` reads an int against the
    papers (issue 14; a recorded switch per row):
    - ``paper``: the stock freezing, except that OREPA's linear deep stem stays trainable (OREPA supplement: the deep
      stem is not frozen and trains at lr x0.1, the ``backbone.net.stem`` lr_mult of the example configs); None and
      DBB keep the stock freezing (DBB's detection code is mmdet's).
    - ``fair``: every backbone the same: the stock freezing with the stem trainable (at the same lr x0.1), whatever
      the stem is, so that None, DBB and OREPA differ only in their blocks.
    Indices given explicitly are taken as they are.
    """
    if freeze not in FREEZE:
        raise ValueError(f"unknown freeze {freeze!r}; expected one of {FREEZE}")
    if not isinstance(frozen_stages, int):
        indices = tuple(sorted(set(int(i) for i in frozen_stages)))
        if not set(indices) <= {0, 1, 2, 3, 4}:
            raise ValueError(f"frozen_stages indices must be within 0 (stem) .. 4 (layer4), got {frozen_stages}")
        return indices
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be -1 .. 4 or a tuple of stage indices, got {frozen_stages}")
    indices = tuple(range(frozen_stages + 1))
    if freeze == "fair" or deep_stem:
        indices = tuple(i for i in indices if i != 0)
    return indices


class _RepBackbone(BaseModule):
    """Shared behaviour: out_indices, frozen stages (``frozen_indices``), norm_eval, strict pretrained loading,
    switch_to_deploy."""

    def _setup(self, net: nn.Module, out_indices, frozen_stages, norm_eval: bool, pretrained: str | None,
               freeze: str = "paper"):
        self.net = net
        self.out_indices = tuple(out_indices)
        if not set(self.out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"out_indices must be within 0..3, got {out_indices}")
        deep_stem = bool(getattr(getattr(net, "config", None), "deep_stem", False))
        self.frozen = frozen_indices(frozen_stages, freeze, deep_stem)
        # the stem's lr multiplier under the reading (frozen_indices): OREPA's deep stem x0.1 (paper and fair), every
        # stem x0.1 under fair; applied by StemLrConstructor (the optim_wrapper's constructor)
        self.stem_lr_mult = STEM_LR_MULT if freeze == "fair" or deep_stem else 1.0
        self.norm_eval, self.pretrained = norm_eval, pretrained
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
        for stage in (stages[i] for i in self.frozen):
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
    ``strides``/``dilations`` per stage give the dilated D8 form (e.g. (1, 2, 1, 1) / (1, 1, 2, 4));
    ``frozen_stages`` and ``freeze``: see :func:`frozen_indices`."""

    def __init__(self, depth: int = 50, rep: str = "none", variant=None, arch: str | None = None,
                 out_indices=(0, 1, 2, 3), strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), frozen_stages=-1,
                 norm_eval: bool = False, pretrained: str | None = None, freeze: str = "paper", init_cfg=None):
        super().__init__(init_cfg)
        arch = arch or f"resnet{depth}"
        net = build_classifier(arch, rep, num_classes=0, variant=variant, strides=tuple(strides),
                               dilations=tuple(dilations))
        self._setup(net, out_indices, frozen_stages, norm_eval, pretrained, freeze)


@MODELS.register_module()
class RepVGG(_RepBackbone):
    """A repbench RepVGG (``arch`` e.g. ``repvgg_a0``) with ``rep`` none / repvgg / orepa_vgg."""

    def __init__(self, arch: str = "repvgg_a0", rep: str = "repvgg", variant=None, out_indices=(0, 1, 2, 3),
                 frozen_stages=-1, norm_eval: bool = False, pretrained: str | None = None, freeze: str = "paper",
                 init_cfg=None):
        super().__init__(init_cfg)
        self._setup(build_classifier(arch, rep, num_classes=0, variant=variant), out_indices, frozen_stages,
                    norm_eval, pretrained, freeze)



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
class StemLrConstructor(DefaultOptimWrapperConstructor):
    """MMEngine's default constructor, with the repbench backbone's stem at its ``stem_lr_mult`` (the freezing
    reading in force, :func:`frozen_indices`): ``optim_wrapper = dict(constructor="repbench.StemLrConstructor",
    ...)``. A config's own ``custom_keys`` for the stem win."""

    def __call__(self, model: nn.Module):
        backbone = getattr(getattr(model, "module", model), "backbone", None)
        mult = getattr(backbone, "stem_lr_mult", 1.0)
        if mult != 1.0:
            keys = self.paramwise_cfg.setdefault("custom_keys", {})
            keys.setdefault("backbone.net.stem", {"lr_mult": mult})
        return super().__call__(model)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class RepOptimizerConstructor(StemLrConstructor):
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
