"""The classification zoo of the OREPA tables: ResNets (and ResNeXt, wide ResNet-18s) and RepVGGs.

Every conv+BN of a network comes from :func:`backbones.variants.make_conv`, so one ``rep`` switch turns a plain
network into its ACB / DBB / OREPA / RepVGG / OREPA-VGG training form; ReLUs live in the networks, never in blocks.
Layouts follow torchvision (stride on the 3x3 of a bottleneck) and the official RepVGG code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn

from .repnext import NeXt
from .variants import NEXT_REPS, REPVGG_REPS, RESNET_REPS, VGG_REPS, RepConfig, make_conv, resolve_variant
from .zoo import SOURCES, TORCHVISION, build_torchvision


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, config: RepConfig, in_planes: int, planes: int, stride: int = 1, groups: int = 1,
                 base_width: int = 64, dilation: int = 1):
        super().__init__()
        self.conv1 = make_conv(config, in_planes, planes, 3, stride, dilation=dilation)
        self.conv2 = make_conv(config, planes, planes, 3, dilation=dilation)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            # OREPA's code forces conv+BN here; DBB/ACB keep 1x1s plain anyway.
            self.shortcut = make_conv(RepConfig("none"), in_planes, planes, 1, stride)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv2(self.relu(self.conv1(x))) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, config: RepConfig, in_planes: int, planes: int, stride: int = 1, groups: int = 1,
                 base_width: int = 64, dilation: int = 1):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out = planes * self.expansion
        self.conv1 = make_conv(config, in_planes, width, 1)
        self.conv2 = make_conv(config, width, width, 3, stride, groups, dilation=dilation)
        self.conv3 = make_conv(config, width, out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_planes != out:
            self.shortcut = make_conv(config, in_planes, out, 1, stride)  # Rep-1x1 under OREPA (official code)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y))
        return self.relu(self.conv3(y) + identity)


class Classifier(nn.Module, ABC):
    """A stem, four stages and a GAP + FC head; ``forward_features`` gives the four stage outputs (backbones)."""

    @abstractmethod
    def stem_forward(self, x):
        """The stem (and, for ResNets, the max-pool)."""

    @abstractmethod
    def stages(self) -> tuple[nn.Module, ...]:
        """The four stages, in order."""

    def forward_features(self, x):
        x = self.stem_forward(x)
        outs = []
        for stage in self.stages():
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x):
        x = self.forward_features(x)[-1]
        return self.fc(self.avgpool(x).flatten(1))


class ResNet(Classifier):
    """ResNet / ResNeXt / wide ResNet-18 with every conv+BN swappable for a re-param block."""

    def __init__(self, block: type, layers: tuple[int, ...], config: RepConfig, num_classes: int = 1000,
                 width: float = 1.0, groups: int = 1, base_width: int = 64,
                 strides: tuple[int, ...] = (1, 2, 2, 2), dilations: tuple[int, ...] = (1, 1, 1, 1)):
        super().__init__()
        self.config = config
        stem_channels = int(64 * width)
        self.stem = make_conv(config, 3, stem_channels, 7, 2, role="stem")
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = stem_channels
        stages = []
        for i, (n, stride, dilation) in enumerate(zip(layers, strides, dilations)):
            planes = int(64 * 2 ** i * width)
            blocks = []
            for j in range(n):
                blocks.append(block(config, in_planes, planes, stride if j == 0 else 1, groups, base_width,
                                    dilation))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = [int(64 * 2 ** i * width) * block.expansion for i in range(4)]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes) if num_classes else None

    def stem_forward(self, x):
        return self.maxpool(self.relu(self.stem(x)))

    def stages(self):
        return self.layer1, self.layer2, self.layer3, self.layer4


class RepVGG(Classifier):
    """RepVGG (Ding et al., CVPR 2021): a stride-2 stem block, four stages whose first block has stride 2, GAP, FC.
    ``override_groups`` maps global layer indices (stage-0 block = 0) to conv groups (the g2/g4 models); ``strides``
    of the stem and the four stages' first layers (RepOptimizers Table 6 sets some to 1). RepOpt-VGG is this
    network with ``rep`` csla / hs / repopt."""

    def __init__(self, layers: tuple[int, ...], widths: tuple[float, ...], config: RepConfig,
                 num_classes: int = 1000, override_groups: dict[int, int] | None = None,
                 strides: tuple[int, ...] = (2, 2, 2, 2, 2)):
        super().__init__()
        if len(strides) != 5:
            raise ValueError(f"strides: one per stride-2 layer (the stem and four stages), got {strides}")
        self.config = config
        override_groups = override_groups or {}
        in_planes = min(64, int(64 * widths[0]))
        self.stem = make_conv(config, 3, in_planes, 3, strides[0])
        self.relu = nn.ReLU(inplace=True)
        # RepOpt-VGG-L2† (RepOptimizers Table 3: "insert SE Blocks after each 3x3 conv"): after the ReLU, squeeze to a
        # quarter of the channels, as the official target block's post-SE (official-code notes Sec. 4)
        if config.se:  # torchvision imported only here: a memory-capped probe child imports backbones without it
            from torchvision.ops import SqueezeExcitation
        self.stem_se = SqueezeExcitation(in_planes, in_planes // 4) if config.se else None
        index = 1
        stages = []
        for i, n in enumerate(layers):
            planes = int(64 * 2 ** i * widths[i]) if i < 3 else int(512 * widths[3])
            blocks = []
            for j in range(n):
                blocks.append(make_conv(config, in_planes, planes, 3, strides[i + 1] if j == 0 else 1,
                                        override_groups.get(index, 1), layer=j + 1))
                blocks.append(nn.ReLU(inplace=True))
                if config.se:
                    blocks.append(SqueezeExcitation(planes, planes // 4))
                in_planes = planes
                index += 1
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.out_channels = [int(64 * 2 ** i * widths[i]) for i in range(3)] + [int(512 * widths[3])]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes) if num_classes else None

    def stem_forward(self, x):
        x = self.relu(self.stem(x))
        return x if self.stem_se is None else self.stem_se(x)

    def stages(self):
        return self.stage1, self.stage2, self.stage3, self.stage4


class VGG(nn.Module):
    """VGG-16 for CIFAR as DyRep's code builds it (official-code notes Sec. 5.4): 13 conv3x3 + BN + ReLU in five
    groups closed by 2x2 max-pools (the last one stride 1), then Linear 512 -> 512 + ReLU and the classifier. Every
    conv+BN from ``make_conv``: ``rep`` dbb gives DBB everywhere, dyrep the plain net DyRep grows."""

    def __init__(self, widths: tuple, config: RepConfig, num_classes: int = 10):
        super().__init__()
        if not num_classes:
            raise ValueError("VGG-16 for CIFAR is a classification network here; it has no headless form")
        self.config = config
        layers, in_planes = [], 3
        for i, width in enumerate(widths):
            if width == "M":
                last = i == len(widths) - 1
                layers.append(nn.MaxPool2d(2, 1 if last else 2))
            else:
                layers += [make_conv(config, in_planes, width, 3), nn.ReLU(inplace=True)]
                in_planes = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(in_planes, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) at width 1.0, as DyRep's ImageNet host (DyRep Table 3, the official code's
    ``mobilenet_v1``): a 3x3/2 conv to 32 channels, 13 depthwise-separable blocks (3x3 depthwise conv + BN + ReLU,
    then 1x1 conv + BN + ReLU), GAP and the classifier. Every conv+BN from ``make_conv``: DyRep grows the stem and
    the depthwise 3x3s (its kxk sites), ``rep="dbb"`` makes them DBBs (the depthwise DBB for the depthwise ones, as
    DBB's own MobileNet); the 1x1s stay plain."""

    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
              (512, 1), (1024, 2), (1024, 1))  # (output channels, depthwise stride)

    def __init__(self, config: RepConfig, num_classes: int = 1000):
        super().__init__()
        if not num_classes:
            raise ValueError("MobileNetV1 is a classification network here; it has no headless form")
        self.config = config
        layers, in_planes = [make_conv(config, 3, 32, 3, 2), nn.ReLU(inplace=True)], 32
        for planes, stride in self.BLOCKS:
            layers += [make_conv(config, in_planes, in_planes, 3, stride, groups=in_planes), nn.ReLU(inplace=True),
                       make_conv(config, in_planes, planes, 1), nn.ReLU(inplace=True)]
            in_planes = planes
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@dataclass(frozen=True)
class Arch:
    """One named architecture: its family, constructor arguments, the reps defined for it and its source."""

    family: str
    kwargs: dict
    source: str


_G2 = {layer: 2 for layer in range(2, 27, 2)}
_G4 = {layer: 4 for layer in range(2, 27, 2)}
ARCHS: dict[str, Arch] = {
    "resnet18": Arch("resnet", dict(block=BasicBlock, layers=(2, 2, 2, 2)), "He et al. 2016; OREPA Table 4"),
    "resnet34": Arch("resnet", dict(block=BasicBlock, layers=(3, 4, 6, 3)), "He et al. 2016; OREPA Table 4"),
    "resnet50": Arch("resnet", dict(block=Bottleneck, layers=(3, 4, 6, 3)), "He et al. 2016; OREPA Table 4"),
    "resnet101": Arch("resnet", dict(block=Bottleneck, layers=(3, 4, 23, 3)), "He et al. 2016; OREPA Table 4"),
    "resnet152": Arch("resnet", dict(block=Bottleneck, layers=(3, 8, 36, 3)), "He et al. 2016; RepNeXt Table 4"),
    "resnext50_32x4d": Arch("resnet", dict(block=Bottleneck, layers=(3, 4, 6, 3), groups=32, base_width=4),
                            "Xie et al. 2017; OREPA supp. Table 2"),
    "wrn18_1.5x": Arch("resnet", dict(block=BasicBlock, layers=(2, 2, 2, 2), width=1.5), "OREPA supp. Table 2"),
    "wrn18_2x": Arch("resnet", dict(block=BasicBlock, layers=(2, 2, 2, 2), width=2.0), "OREPA supp. Table 2"),
    "repvgg_a0": Arch("repvgg", dict(layers=(2, 4, 14, 1), widths=(0.75, 0.75, 0.75, 2.5)), "RepVGG Table 2"),
    "repvgg_a1": Arch("repvgg", dict(layers=(2, 4, 14, 1), widths=(1, 1, 1, 2.5)), "RepVGG Table 2"),
    "repvgg_a2": Arch("repvgg", dict(layers=(2, 4, 14, 1), widths=(1.5, 1.5, 1.5, 2.75)), "RepVGG Table 2"),
    "repvgg_b0": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(1, 1, 1, 2.5)), "RepVGG Table 2"),
    "repvgg_b1": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(2, 2, 2, 4)), "RepVGG Table 2"),
    "repvgg_b1g2": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(2, 2, 2, 4), override_groups=_G2),
                        "RepVGG Table 2"),
    "repvgg_b1g4": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(2, 2, 2, 4), override_groups=_G4),
                        "RepVGG Table 2"),
    "repvgg_b2": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(2.5, 2.5, 2.5, 5)), "RepVGG Table 2"),
    "repvgg_b2g4": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(2.5, 2.5, 2.5, 5), override_groups=_G4),
                        "RepVGG Table 2"),
    "repvgg_b3": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(3, 3, 3, 5)), "RepVGG Table 2"),
    # RepOptimizers Table 1: B1 / B2 are RepVGG-B1 / B2's layouts, L1 / L2 deeper (8, 14, 24, 1)
    "repoptvgg_b1": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(2, 2, 2, 4)), "RepOptimizers Table 1"),
    "repoptvgg_b2": Arch("repvgg", dict(layers=(4, 6, 16, 1), widths=(2.5, 2.5, 2.5, 5)), "RepOptimizers Table 1"),
    "repoptvgg_l1": Arch("repvgg", dict(layers=(8, 14, 24, 1), widths=(2, 2, 2, 4)), "RepOptimizers Table 1"),
    "repoptvgg_l2": Arch("repvgg", dict(layers=(8, 14, 24, 1), widths=(2.5, 2.5, 2.5, 5)), "RepOptimizers Table 1"),
    "vgg16_cifar": Arch("vgg", dict(widths=(64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                            512, 512, 512, "M")), "DyRep Table 2 (official code's VGG-16 for CIFAR)"),
    "mobilenet_v1": Arch("mobilenet", {}, "Howard et al. 2017 (width 1.0); DyRep Table 3"),
    # ConvNeXt (Liu et al. 2022) and RepNeXt's Table 5 chain towards RepNeXt (backbones/repnext.py), T / S / B sizes
    **{f"{step}_{size}": Arch("next", dict(depths=depths, dims=dims, step=step), source)
       for size, depths, dims in (("t", (3, 3, 9, 3), (96, 192, 384, 768)), ("s", (3, 3, 27, 3), (96, 192, 384, 768)),
                                  ("b", (3, 3, 27, 3), (128, 256, 512, 1024)))
       for step, source in (("convnext", "Liu et al. 2022; RepNeXt Tables 4-6"),
                            ("lc2pwconv", "RepNeXt Table 5"), ("ln2bn", "RepNeXt Table 5"),
                            ("shortcut_act", "RepNeXt Table 5"), ("repnext", "RepNeXt Sec. 3.3"))},
    # plain torchvision networks that tables compare against (backbones/zoo.py); rep "none" only
    **{name: Arch("torchvision", {}, f"torchvision {builder}; {SOURCES[name]}") for name, builder in TORCHVISION.items()},
}
FAMILY_REPS = {"resnet": RESNET_REPS, "repvgg": REPVGG_REPS, "vgg": VGG_REPS, "torchvision": ("none",),
               "mobilenet": ("none", "dbb", "dyrep"), "next": NEXT_REPS}


def check_combination(arch: str, rep: str) -> Arch:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    spec = ARCHS[arch]
    if rep not in FAMILY_REPS[spec.family]:
        raise ValueError(f"rep {rep!r} is not defined for {arch} (a {spec.family}); "
                         f"defined: {', '.join(FAMILY_REPS[spec.family])}")
    return spec


def build_classifier(arch: str, rep: str = "none", num_classes: int = 1000, variant: str | dict | None = None,
                     **backbone_kwargs) -> nn.Module:
    """A classification network in its training form, e.g. ``build_classifier("resnet18", rep="orepa")``.

    ``variant``: ``None`` (the paper's main method), a preset name, or a dict of overrides; see
    :mod:`backbones.variants`. ``num_classes=0`` builds the network without its head (a backbone).
    ``backbone_kwargs`` (ResNets: ``strides``, ``dilations``) are for dense-prediction backbones.
    """
    spec = check_combination(arch, rep)
    config = resolve_variant(rep, variant)
    if spec.family == "torchvision":
        if backbone_kwargs:
            raise ValueError(f"{arch} takes no options, got {sorted(backbone_kwargs)}")
        model = build_torchvision(arch, num_classes)
    elif spec.family == "next":
        if backbone_kwargs or not num_classes:
            raise ValueError(f"{arch} is a classification network here: no options, no headless form")
        if (rep == "repnext") != (spec.kwargs["step"] == "repnext"):
            raise ValueError(f"rep {rep!r} is not defined for {arch}: RepNeXt archs take rep 'repnext', ConvNeXt and "
                             "its Table 5 steps rep 'none'")
        model = NeXt(num_classes=num_classes, unit=config.unit, act=config.act,
                     layer_scale=config.layer_scale, drop_path=config.drop_path, **spec.kwargs)
    elif spec.family == "resnet":
        model = ResNet(config=config, num_classes=num_classes, **spec.kwargs, **backbone_kwargs)
    elif spec.family in ("vgg", "mobilenet"):
        if backbone_kwargs:
            raise ValueError(f"{arch} takes no options, got {sorted(backbone_kwargs)}")
        network = VGG if spec.family == "vgg" else MobileNetV1
        model = network(config=config, num_classes=num_classes, **spec.kwargs)
    else:
        if set(backbone_kwargs) - {"strides"}:
            raise ValueError(f"{arch} takes only the option strides, got {sorted(backbone_kwargs)}")
        if config.strides is not None:
            if "strides" in backbone_kwargs:
                raise ValueError(f"strides given twice: by the variant {config.strides} and as an option")
            backbone_kwargs["strides"] = config.strides
        model = RepVGG(config=config, num_classes=num_classes, **spec.kwargs, **backbone_kwargs)
    model.arch, model.rep = arch, rep
    return model
