"""Which block a network gets for each conv, per ``rep``, and the paper-defined variants of it.

A variant is a small recorded configuration (:class:`RepConfig`); ``variant`` in ``build_classifier`` is ``None``
(the paper's main method), a preset name, or a dict of overrides on the rep's default. The resolved config is what a
run records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .blocks import (ACB, DBB, DBB_BRANCHES, OREPA, OREPA_BRANCHES, ConvBN, OREPA1x1, OREPADeepStem, RepVGGBlock,
                     ReparamBlock, orepa_vgg_block)
from .branches import ConvGeometry
from .dyrep import OPS, allowed_ops
from .repopt import CSLA, RepOptConvBN, hs_scale_init

RESNET_REPS = ("none", "acb", "dbb", "orepa", "dyrep")
VGG_REPS = ("none", "dbb", "dyrep")  # VGG-16 for CIFAR (DyRep Table 2): plain, DBB everywhere, DyRep
REPVGG_REPS = ("none", "repvgg", "orepa_vgg", "csla", "hs", "repopt")  # the last three: RepOptimizers
NEXT_REPS = ("none", "repnext")  # ConvNeXt and RepNeXt's Table 5 chain (backbones/repnext.py): none; RepNeXt: repnext


@dataclass(frozen=True)
class RepConfig:
    """The block configuration of one ``rep`` (fields a rep does not use keep their defaults and are rejected as
    overrides)."""

    rep: str
    form: str = "offline_bn"
    branches: tuple[str, ...] = ()
    scaling: str = "vector"
    post_norm: bool = True
    init: str = "code"
    deep_stem: bool = False   # OREPA: the 7x7 stem becomes the linear deep stem
    rep_1x1: bool = False     # OREPA: bottleneck 1x1s become Rep-1x1
    hs_init: str = "code"     # RepOptimizers' CSLA / HS scale init by depth: code, paper, ones (backbones/repopt.py)
    strides: tuple[int, ...] | None = None  # RepVGG-family networks: strides of the five stride-2 layers (RepOpt
    #                                         Table 6's Hyper-Search variants); None: the architecture's own
    se: bool = False  # RepOpt-VGG: an SE block after each 3x3 conv's ReLU (RepOpt Table 3's "†"; backbones/networks)
    unit: str = "u3"          # RepNeXt: RepUnit 1, 2 or 3 (backbones/repnext.py; the paper's u3 the default)
    act: str = "gelu"         # ConvNeXt / RepNeXt chain: the blocks' activation (gelu as ConvNeXt; relu: a check)
    layer_scale: float = 1e-6  # ConvNeXt's layer scale init, kept through the chain (0: none); folds at deploy
    drop_path: float = 0.0    # ConvNeXt's stochastic depth (the last block's rate); the recipes say which

    def as_dict(self) -> dict:
        d = asdict(self)
        d["branches"] = list(self.branches)
        d["strides"] = None if self.strides is None else list(self.strides)
        return d


DEFAULTS = {
    "none": RepConfig("none"),
    "acb": RepConfig("acb", branches=("origin", "hor", "ver")),
    "dbb": RepConfig("dbb", branches=DBB_BRANCHES, post_norm=False),
    "orepa": RepConfig("orepa", form="online", branches=OREPA_BRANCHES, deep_stem=True, rep_1x1=True),
    "repvgg": RepConfig("repvgg", branches=("origin", "1x1", "identity"), post_norm=False),
    "orepa_vgg": RepConfig("orepa_vgg", form="online"),
    "csla": RepConfig("csla", form="linear_offline"),
    "hs": RepConfig("hs", form="linear_offline"),
    "repopt": RepConfig("repopt"),
    "dyrep": RepConfig("dyrep"),  # the plain network; its convs grow during training (runners/dyrep.py)
    "repnext": RepConfig("repnext"),  # RepNeXt's RepUnits (backbones/repnext.py); deploy levels rRep / sRep
}
TUNABLE = {  # the fields a variant may change, per rep
    "none": set(), "acb": set(),
    "dbb": {"form", "scaling", "post_norm", "branches"},
    "orepa": {"form", "branches", "scaling", "post_norm", "init", "deep_stem", "rep_1x1"},
    "repvgg": {"form", "scaling", "post_norm"},
    "orepa_vgg": {"form"},
    "csla": {"hs_init", "strides"}, "hs": {"hs_init", "strides"}, "repopt": {"strides", "se"}, "dyrep": set(),
    "repnext": {"unit", "act", "layer_scale", "drop_path"},
}
_WITHOUT_BRANCH_NORM = dict(form="linear_offline", scaling="none", post_norm=True)
PRESETS = {
    "dbb": {"no_branch_norm": _WITHOUT_BRANCH_NORM,                            # OREPA Table 1
            "dyrep_ops": dict(branches=OPS)},  # DyRep Table 8's DBB*: DBB over DyRep's 7 ops, where a conv allows each
    "repvgg": {"no_branch_norm": _WITHOUT_BRANCH_NORM,                         # OREPA Table 1
               "online": dict(form="online", scaling="vector", post_norm=True)},  # supplement Table 3
    "orepa_vgg": {"offline": dict(form="offline_bn")},                         # supplement Table 3
    "repnext": {unit: dict(unit=unit) for unit in ("u1", "u2", "u3")},         # RepNeXt Tables 2-3
    "orepa": {
        # OREPA Table 2, the component chain on top of DBB's branches
        "dbb_online": dict(branches=DBB_BRANCHES, deep_stem=False, rep_1x1=False),
        "prior": dict(branches=DBB_BRANCHES + ("prior",), deep_stem=False, rep_1x1=False),
        "dw_pw": dict(branches=DBB_BRANCHES + ("prior", "dw_pw"), deep_stem=False, rep_1x1=False),
        "deep_stem": dict(rep_1x1=False),
        # OREPA Table 3, linearization variants
        "scalar": dict(scaling="scalar"),
        "no_scaling": dict(scaling="none"),
        "no_post_norm": dict(post_norm=False),
        "paper_init": dict(init="paper"),
        # Figure 8 / supplement Table 3: the offline counterpart, every branch with its own BN
        "offline_bn": dict(form="offline_bn", post_norm=False),
    },
}


def resolve_variant(rep: str, variant: str | dict | None = None) -> RepConfig:
    """``variant``: None, a preset name of ``rep``, or a dict of overrides (a preset may be named with key
    ``preset``)."""
    if rep not in DEFAULTS:
        raise ValueError(f"unknown rep {rep!r}; known: {sorted(DEFAULTS)}")
    config = DEFAULTS[rep]
    if variant is None:
        return config
    overrides = dict(variant) if isinstance(variant, dict) else {"preset": variant}
    if "rep" in overrides:  # a recorded, fully resolved config (RepConfig.as_dict()) round-trips
        if overrides.pop("rep") != rep:
            raise ValueError(f"variant {variant} was resolved for another rep than {rep!r}")
        defaults = config.as_dict()
        overrides = {k: v for k, v in overrides.items() if defaults.get(k) != v}
    preset = overrides.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS.get(rep, {}):
            raise ValueError(f"unknown variant {preset!r} for rep {rep!r}; known: {sorted(PRESETS.get(rep, {}))}")
        overrides = {**PRESETS[rep][preset], **overrides}
    names = {f.name for f in fields(RepConfig)}
    bad = set(overrides) - (TUNABLE[rep] & names)
    if bad:
        raise ValueError(f"variant keys {sorted(bad)} do not apply to rep {rep!r}; tunable: {sorted(TUNABLE[rep])}")
    if "branches" in overrides:
        overrides["branches"] = tuple(overrides["branches"])
    if overrides.get("strides") is not None:
        overrides["strides"] = tuple(overrides["strides"])
    if overrides.get("form") == "offline_bn":
        overrides.setdefault("post_norm", False)
    return replace(config, **overrides)


def make_conv(config: RepConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              groups: int = 1, dilation: int = 1, role: str = "body", layer: int = 0) -> ReparamBlock:
    """The block for one conv+BN of a network (OREPA's ``convnet_utils.choose_blk``).

    ``role``: ``body`` or ``stem`` (ResNet's 7x7); ``layer``: the conv's depth in its stage (1 = first, 0 = stem),
    which sets the CSLA / Hyper-Search scales' initial value. Under DBB and ACB, 1x1 and 7x7 convs stay conv+BN, as in their
    official code; the caller passes ``RepConfig("none")`` for convs a method leaves alone (BasicBlock shortcuts).
    """
    geometry = ConvGeometry(in_channels, out_channels, kernel_size, stride, None, dilation, groups)
    rep = config.rep
    if rep in ("none", "dyrep"):  # DyRep starts from the plain conv+BN and grows it while training
        return ConvBN(geometry)
    if rep == "orepa":
        if kernel_size == 7 and role == "stem":
            if not config.deep_stem:
                return ConvBN(geometry)
            return OREPADeepStem(in_channels, out_channels, stride, config.form, config.branches, config.scaling,
                                 config.init, config.post_norm)
        if kernel_size == 1:
            if not config.rep_1x1:
                return ConvBN(geometry)
            return OREPA1x1(geometry, config.form, config.scaling, config.post_norm)
        return OREPA(geometry, config.branches, config.form, config.scaling, config.post_norm, config.init)
    if kernel_size != 3:
        return ConvBN(geometry)
    if rep == "acb":
        return ACB(geometry)
    if rep == "dbb":
        return DBB(geometry, config.form, config.scaling, config.post_norm, allowed_ops(geometry, config.branches))
    if rep == "repvgg":
        return RepVGGBlock(geometry, config.form, config.scaling, config.post_norm)
    if rep == "orepa_vgg":
        return orepa_vgg_block(geometry, config.form)
    if rep in ("csla", "hs"):
        return CSLA(geometry, hs_scale_init(layer, config.hs_init), trainable=rep == "hs")
    if rep == "repopt":
        return RepOptConvBN(geometry)
    raise ValueError(f"unknown rep {rep!r}")
