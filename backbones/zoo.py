"""Plain networks from torchvision, for the rows that compare re-parameterized models against them (RepOptimizers
Table 3: VGG-16 and EfficientNet-B2 ... B5; RepNeXt Table 4: MobileNetV3, EfficientNet, Swin). ``build_classifier("efficientnet_b2")`` builds torchvision's model with
the table's head and turns every conv followed by a BN into a :class:`~backbones.blocks.ConvBN` block, so that
``deploy`` folds those BNs exactly as it does in this suite's own plain ("none") networks: the deployed model is the
network a paper times at inference. Everything else (SE blocks, SiLU, dropout and stochastic depth at torchvision's
defaults) is torchvision's own.

VGG-16 is torchvision's ``vgg16_bn``: the paper trains "the original VGGNet-16" with RepOpt-VGG's recipe (lr 0.1
for a global batch of 256), which VGG-16 without BN does not survive from scratch; after deploy the BNs are
folded into the convs, so the inference structure (and Table 3's throughput) is the original's. A recorded choice.
"""

from __future__ import annotations

from torch import nn

from .blocks import ConvBN

TORCHVISION = {  # arch -> torchvision builder
    "vgg16": "vgg16_bn",
    "efficientnet_b2": "efficientnet_b2", "efficientnet_b3": "efficientnet_b3",
    "efficientnet_b4": "efficientnet_b4", "efficientnet_b5": "efficientnet_b5",
    # RepNeXt Tables 4 and 6 (ViT-B and MaxViT-T are not here: torchvision fixes their input size when it builds
    # them, and a run trains and times one model at two resolutions, e.g. 32 and 224 at mini)
    "mobilenet_v3_small": "mobilenet_v3_small", "mobilenet_v3_large": "mobilenet_v3_large",
    "swin_t": "swin_t", "swin_s": "swin_s", "swin_b": "swin_b",
}
SOURCES = {"vgg16": "RepOptimizers Table 3", "efficientnet_b2": "RepOptimizers Table 3",
           "efficientnet_b3": "RepOptimizers Table 3; RepNeXt Table 4", "efficientnet_b4": "RepOptimizers Table 3; "
           "RepNeXt Table 4", "efficientnet_b5": "RepOptimizers Table 3; RepNeXt Table 4",
           **dict.fromkeys(("mobilenet_v3_small", "mobilenet_v3_large", "swin_t", "swin_s", "swin_b"),
                           "RepNeXt Tables 4 and 6")}


def build_torchvision(arch: str, num_classes: int) -> nn.Module:
    """torchvision's ``arch`` (randomly initialised, nothing downloaded) with its conv-BN pairs as ConvBN blocks."""
    import torchvision  # here, not at import: a memory-capped probe child imports backbones without loading it
    if not num_classes:
        raise ValueError(f"{arch} is a classification network here; it has no headless (backbone) form")
    model = getattr(torchvision.models, TORCHVISION[arch])(weights=None, num_classes=num_classes)
    _wrap_conv_bn(model)
    return model


def _wrap_conv_bn(module: nn.Module) -> None:
    """In every nn.Sequential, a Conv2d directly followed by a BatchNorm2d becomes ConvBN + nn.Identity (the index
    of every other child is kept, so torchvision's forward code is untouched)."""
    for child in module.children():
        _wrap_conv_bn(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            if type(module[i]) is nn.Conv2d and type(module[i + 1]) is nn.BatchNorm2d:
                module[i], module[i + 1] = ConvBN.of(module[i], module[i + 1]), nn.Identity()
