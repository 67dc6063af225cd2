"""Published checkpoints of the official implementations, loaded exactly into this suite's models.

``from_official(path, arch, rep, source)`` reads a file as the official repositories save it (a bare state dict,
``{'state_dict': ...}`` or ``{'model': ...}``, DDP's ``module.`` prefix; ``weights_only=True``), renames every key to
this suite's layout by the source's rules (written from the layouts, ../shared/reference/official-code-notes.md; no
official code is imported), and loads it strictly into ``build_classifier(arch, rep)`` — deployed first when the
file holds the deploy form. A key no rule places, a key the model lacks, a missing key or a shape that differs is
an :class:`OfficialError` naming the first such keys: the file is refused, never half-loaded.

Sources built so far: ``repvgg`` (DingXiaoH/RepVGG: ``RepVGGBlock`` training files, and files converted to the
deploy form by the repo's own tool) and ``dbb`` (DingXiaoH/DiverseBranchBlock: DBB and ACB ResNets, DBB MobileNetV1,
training and deploy files, both BNAndPad layouts) and ``repopt`` (DingXiaoH/RepOptimizers: RepOpt-VGG targets, conv +
BN + ReLU per layer; the repo converts none, a fused file — biased convs, no BN — loads deployed). ``orepa`` is
refused with that message until its mapping lands.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .deploy import CheckpointError

SOURCES = ("orepa", "dbb", "repvgg", "repopt")
BUILT = ("repvgg", "dbb", "repopt")


class OfficialError(CheckpointError):
    """A file that cannot be mapped fully onto the model: the message names the first keys at fault."""


def read_official(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of an official file: unwrapped from ``state_dict`` / ``model``, DDP's ``module.`` removed."""
    path = Path(path)
    if not path.is_file():
        raise OfficialError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects weights_only refuses
        raise OfficialError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise OfficialError(f"{path} holds no state dict (a bare one, or under 'state_dict' / 'model')")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


# -- RepVGG (DingXiaoH/RepVGG, repvgg.py): stage0 is one block, stages 1-4 Sequentials of blocks, ``linear`` -----------
# A training block: rbr_dense = (conv 3x3, BN), rbr_1x1 = (conv 1x1, BN), rbr_identity = BN where in == out and stride
# 1; a converted block: rbr_reparam (conv 3x3 with bias). This suite: ``stem``; ``stage{i}`` holds block, ReLU, block,
# ... (block j at index 2j); a training block's branches ``origin`` / ``1x1`` and norms ``origin`` / ``1x1`` /
# ``identity``; a deployed block is the conv itself; ``fc``.
_REPVGG_PARTS = ((r"rbr_dense\.conv\.weight$", "branches.origin.weight"), (r"rbr_dense\.bn\.", "norms.origin."),
                 (r"rbr_1x1\.conv\.weight$", "branches.1x1.weight"), (r"rbr_1x1\.bn\.", "norms.1x1."),
                 (r"rbr_identity\.", "norms.identity."), (r"rbr_reparam\.weight$", "weight"),
                 (r"rbr_reparam\.bias$", "bias"))


def _vgg_site(key: str) -> tuple[str, str] | None:
    """A VGG-style file's block (``stage0``: our ``stem``; ``stage{s}.{j}``: our ``stage{s}.{2j}``, our stages
    interleave the ReLUs) as (our prefix, the rest of the key)."""
    found = re.match(r"stage0\.(.*)$", key) or re.match(r"stage([1-4])\.(\d+)\.(.*)$", key)
    if not found:
        return None
    prefix = "stem." if key.startswith("stage0.") else f"stage{found.group(1)}.{2 * int(found.group(2))}."
    return prefix, found.groups()[-1]


def _repvgg_key(key: str, arch: str, target: dict, form: str) -> str | None:
    if key.startswith("linear."):
        return "fc." + key[len("linear."):]
    if (site := _vgg_site(key)) is None:
        return None
    prefix, rest = site
    for pattern, replacement in _REPVGG_PARTS:
        if re.match(pattern, rest):
            return prefix + re.sub(pattern, replacement, rest, count=1)
    return None


# -- DBB / ACB (DingXiaoH/DiverseBranchBlock): only 3x3 convs become blocks, 1x1 and 7x7 stay ConvBN ---------------------
# ResNet: ``stage0.conv1`` (our ``stem``), ``stage{s}.{j}.{conv1,conv2,conv3,shortcut}`` (our ``layer{s}.{j}...``),
# ``linear``; MobileNetV1: ``conv1`` (our ``features.0``), ``stem.{i}.depthwise`` / ``.pointwise`` (our
# ``features.{4i+2}`` / ``features.{4i+4}``: ReLUs between). Within a site: ConvBN ``conv`` / ``bn`` as ours; DBB
# branches ``dbb_origin``, ``dbb_1x1``, ``dbb_avg`` (conv, BNAndPad ``bn``, ``avgbn``), ``dbb_1x1_kxk`` (``idconv1``
# — a zero-initialised difference from the identity, as our ``first`` is: copied as is — or ``conv1`` at a
# depthwise site, BNAndPad ``bn1``, ``conv2``, ``bn2``); files from before the repo's PR #10 lack the BNAndPad's inner
# ``.bn``. ACB: ``square`` / ``hor`` (1 x k) / ``ver`` (k x 1) convs and BNs. Deploy: ``dbb_reparam`` / ``fused_conv``
# / a ConvBN's ``conv`` with bias -> the site's conv.
_DBB_PARTS = ((r"dbb_origin\.conv\.weight$", "branches.origin.weight"), (r"dbb_origin\.bn\.", "norms.origin."),
              (r"dbb_1x1\.conv\.weight$", "branches.1x1.weight"), (r"dbb_1x1\.bn\.", "norms.1x1."),
              (r"dbb_avg\.conv\.weight$", "branches.avg.conv1x1"), (r"dbb_avg\.bn\.(bn\.)?", "branches.avg.mid_bn."),
              (r"dbb_avg\.avgbn\.", "norms.{avg}."),
              (r"dbb_1x1_kxk\.(idconv1|conv1)\.weight$", "branches.1x1_kxk.first"),
              (r"dbb_1x1_kxk\.bn1\.(bn\.)?", "branches.1x1_kxk.mid_bn."),
              (r"dbb_1x1_kxk\.conv2\.weight$", "branches.1x1_kxk.second"), (r"dbb_1x1_kxk\.bn2\.", "norms.1x1_kxk."),
              (r"square_conv\.weight$", "branches.origin.weight"), (r"square_bn\.", "norms.origin."),
              (r"hor_conv\.weight$", "branches.hor.weight"), (r"hor_bn\.", "norms.hor."),
              (r"ver_conv\.weight$", "branches.ver.weight"), (r"ver_bn\.", "norms.ver."))
_DBB_DEPLOY = ((r"(dbb_reparam|fused_conv|conv)\.(weight|bias)$", r"\2"),)


def _dbb_site(key: str, arch: str) -> tuple[str, str] | None:
    """(our prefix of the conv site, the rest of the key)."""
    if arch.startswith("mobilenet"):
        found = re.match(r"conv1\.(.*)$", key)
        if found:
            return "features.0.", found.group(1)
        found = re.match(r"stem\.(\d+)\.(depthwise|pointwise)\.(.*)$", key)
        if found:
            i = int(found.group(1))
            return f"features.{4 * i + (2 if found.group(2) == 'depthwise' else 4)}.", found.group(3)
        return None
    found = re.match(r"stage0\.conv1\.(.*)$", key)
    if found:
        return "stem.", found.group(1)
    found = re.match(r"stage([1-4])\.(\d+)\.(conv[123]|shortcut)\.(.*)$", key)
    if found:
        return f"layer{found.group(1)}.{found.group(2)}.{found.group(3)}.", found.group(4)
    return None


def _dbb_key(key: str, arch: str, target: dict, form: str) -> str | None:
    if key.startswith("linear."):
        return "fc." + key[len("linear."):]
    site = _dbb_site(key, arch)
    if site is None:
        return None
    prefix, rest = site
    if form == "train" and re.match(r"(conv\.weight|bn\.\w+)$", rest):  # a ConvBN: the same names as ours
        return prefix + rest
    for pattern, replacement in _DBB_DEPLOY if form == "deploy" else _DBB_PARTS:
        if re.match(pattern, rest):
            # the averaging branch's BN: ``norms.avg`` (after a 1x1 conv) or, at a depthwise site, ``norms.avg_only``
            avg = "avg_only" if any(k.startswith(prefix + "norms.avg_only.") for k in target) else "avg"
            return prefix + re.sub(pattern, replacement.replace("{avg}", avg), rest, count=1)
    return None


# -- RepOpt-VGG targets (DingXiaoH/RepOptimizers, ``RealVGGBlock``): ``stage0`` (our ``stem``), ``stage{s}.{j}`` (ours
# ``stage{s}.{2j}``), each ``conv`` (no bias) + ``bn``; ``linear``. Our targets also hold the RepOptimizer's constants
# (``scale_conv``, ``scale_1x1``, ``identity_in_mult``: buffers for the Grad Mults, not used by the forward), which
# no official file has: the model keeps its own. Files with the post-SE blocks (``post_se``) are not mapped.
def _repopt_key(key: str, arch: str, target: dict, form: str) -> str | None:
    if key.startswith("linear."):
        return "fc." + key[len("linear."):]
    if (site := _vgg_site(key)) is None:
        return None
    prefix, rest = site
    if form == "deploy":
        found = re.match(r"conv\.(weight|bias)$", rest)
        return prefix + found.group(1) if found else None
    return prefix + rest if re.match(r"(conv\.weight|bn\.\w+)$", rest) else None


MAPPERS = {"repvgg": _repvgg_key, "dbb": _dbb_key, "repopt": _repopt_key}
# what marks a file's deploy form: a converted block's name (a RepOpt-VGG target's conv has a bias only when fused)
DEPLOY_MARKERS = {"repvgg": ("rbr_reparam.",), "dbb": ("dbb_reparam.", "fused_conv."), "repopt": ("conv.bias",)}
MODEL_ONLY = {"repopt": ("scale_conv", "scale_1x1", "identity_in_mult")}  # ours, never in a file: the model's own


def official_form(state: dict, source: str) -> str:
    """``deploy`` when the file holds the converted (inference) form, else ``train``."""
    return "deploy" if any(marker in k for k in state for marker in DEPLOY_MARKERS[source]) else "train"


def map_official(state: dict[str, Tensor], source: str, target: dict[str, Tensor], arch: str = "",
                 form: str = "train") -> dict[str, Tensor]:
    """``state`` (of ``arch``, in ``form``) renamed to the keys of ``target`` (a model's state dict), checked key by
    key and shape by shape. BN's ``num_batches_tracked`` counters, which some files lack, are taken from ``target``
    where absent."""
    mapper = MAPPERS[source]
    mapped, unplaced, mismatched = {}, [], []
    for key, value in state.items():
        new = mapper(key, arch, target, form)
        if new is None or new not in target:
            unplaced.append(key)
        elif tuple(value.shape) != tuple(target[new].shape):
            mismatched.append(f"{key} {tuple(value.shape)} (the model's {new}: {tuple(target[new].shape)})")
        else:
            mapped[new] = value.to(target[new].dtype)
    if unplaced:
        raise OfficialError(f"{len(unplaced)} key(s) of the file have no place in the model: "
                            + ", ".join(unplaced[:3]) + (", ..." if len(unplaced) > 3 else ""))
    if mismatched:
        raise OfficialError(f"{len(mismatched)} tensor(s) differ in shape (another architecture?): "
                            + "; ".join(mismatched[:2]) + ("; ..." if len(mismatched) > 2 else ""))
    own = ("num_batches_tracked", *MODEL_ONLY.get(source, ()))
    missing = [k for k in target if k not in mapped and not k.endswith(own)]
    if missing:
        raise OfficialError(f"{len(missing)} parameter(s) of the model are not in the file (truncated, or another "
                            "architecture?): " + ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""))
    return {**{k: v for k, v in target.items() if k not in mapped}, **mapped}


def from_official(path: str | os.PathLike, arch: str, rep: str, source: str, variant: str | dict | None = None
                  ) -> nn.Module:
    """A repbench model holding the weights of an official checkpoint (see the module docstring), in the form the
    file holds (train, or deploy), in eval mode; its head has the file's number of classes."""
    from . import build_classifier, deploy

    if source not in SOURCES:
        raise OfficialError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if source not in BUILT:
        raise OfficialError(f"source {source!r}: its mapping is not built yet (built: {', '.join(BUILT)})")
    state = read_official(path)
    head = state.get("linear.weight")
    if head is None or head.dim() != 2:
        raise OfficialError(f"{path}: no classifier ('linear.weight') in the file")
    model = build_classifier(arch, rep, variant=variant, num_classes=head.shape[0]).eval()
    form = official_form(state, source)
    if form == "deploy":
        model = deploy(model)
    model.load_state_dict(map_official(state, source, model.state_dict(), arch, form), strict=True)
    return model.eval()
