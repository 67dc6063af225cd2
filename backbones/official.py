"""Published checkpoints of the official implementations, loaded exactly into this suite's models.

``from_official(path, arch, rep, source)`` reads a file as the official repositories save it (a bare state dict,
``{'state_dict': ...}`` or ``{'model': ...}``, DDP's ``module.`` prefix; ``weights_only=True``), renames every key to
this suite's layout by the source's rules (written from the layouts, ../shared/reference/official-code-notes.md; no
official code is imported), and loads it strictly into ``build_classifier(arch, rep)`` — deployed first when the
file holds the deploy form. A key no rule places, a key the model lacks, a missing key or a shape that differs is
an :class:`OfficialError` naming the first such keys: the file is refused, never half-loaded.

Sources: ``orepa`` (JUGGHM/OREPA_CVPR2022: ResNet / WideResNet / ResNeXt with OREPA, DBB or plain ConvBN, RepVGG
and OREPA-VGG; two tensors need more than a new name, see :func:`_orepa_tensor`), ``repvgg`` (DingXiaoH/RepVGG:
``RepVGGBlock`` training files, and files converted to the deploy form by the repo's own tool), ``dbb``
(DingXiaoH/DiverseBranchBlock: DBB and ACB ResNets, DBB MobileNetV1, training and deploy files, both BNAndPad layouts)
and ``repopt`` (DingXiaoH/RepOptimizers: RepOpt-VGG targets, conv + BN + ReLU per layer — the repo converts none, a
fused file, biased convs and no BN, loads deployed — and its Hyper-Search / CSLA and RepVGG-baseline models).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .deploy import CheckpointError

SOURCES = ("orepa", "dbb", "repvgg", "repopt")


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


def _vgg_key(key: str, parts: tuple[tuple[str, str], ...]) -> str | None:
    """A VGG-style file's key renamed by the first of ``parts`` (pattern, replacement) its block's rest matches."""
    if key.startswith("linear."):
        return "fc." + key[len("linear."):]
    if (site := _vgg_site(key)) is None:
        return None
    prefix, rest = site
    for pattern, replacement in parts:
        if re.match(pattern, rest):
            return prefix + re.sub(pattern, replacement, rest, count=1)
    return None


def _repvgg_key(key: str, arch: str, rep: str, target: dict, form: str) -> str | None:
    return _vgg_key(key, _REPVGG_PARTS)


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


def _dbb_key(key: str, arch: str, rep: str, target: dict, form: str) -> str | None:
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


# -- RepOptimizers (DingXiaoH/RepOptimizers, ``RepOptVGG(mode)``): ``stage0`` (our ``stem``), ``stage{s}.{j}`` (ours
# ``stage{s}.{2j}``), ``linear``. Per block: the target (``RealVGGBlock``, our rep ``repopt``) ``conv`` (no bias) +
# ``bn``; the Hyper-Search / CSLA model (``LinearAddBlock``, our ``hs`` / ``csla``) ``conv``, ``conv_1x1``,
# ``scale_conv.weight``, ``scale_1x1.weight``, ``scale_identity.weight`` (ScaleLayers: our ``scale_*`` tensors) and
# one ``bn``; the baseline (its ``RepVGGBlock``, our ``repvgg``) ``conv_3x3`` / ``bn_3x3``, ``conv_1x1`` / ``bn_1x1``,
# ``bn_identity``. Deploy (the baseline's, or a fused target): ``conv`` with a bias. Our targets also hold the
# RepOptimizer's constants (``scale_conv``, ``scale_1x1``, ``identity_in_mult``: buffers for the Grad Mults, not used
# by the forward), which no target file has: the model keeps its own. Files with post-SE blocks are not mapped.
_REPOPT_PARTS = {
    "repopt": ((r"conv\.weight$", "conv.weight"), (r"bn\.", "bn.")),
    "hs": ((r"scale_(conv|1x1|identity)\.weight$", r"scale_\1"), (r"(conv|conv_1x1)\.weight$", r"\1.weight"),
           (r"bn\.", "bn.")),
    "repvgg": ((r"conv_3x3\.weight$", "branches.origin.weight"), (r"bn_3x3\.", "norms.origin."),
               (r"conv_1x1\.weight$", "branches.1x1.weight"), (r"bn_1x1\.", "norms.1x1."),
               (r"bn_identity\.", "norms.identity.")),
}
_REPOPT_PARTS |= {"none": _REPOPT_PARTS["repopt"], "csla": _REPOPT_PARTS["hs"]}  # a plain conv + BN net reads as a target


def _repopt_key(key: str, arch: str, rep: str, target: dict, form: str) -> str | None:
    return _vgg_key(key, ((r"conv\.(weight|bias)$", r"\1"),) if form == "deploy" else _REPOPT_PARTS.get(rep, ()))


# -- OREPA (JUGGHM/OREPA_CVPR2022) ------------------------------------------------------------------------------------
# ResNet / WideResNet / ResNeXt as the DBB repo's layout (``stage0.conv1``, ``stage{s}.{j}.{conv1,conv2,conv3,
# shortcut}``, ``linear``). Under ``-t OREPA`` a 3x3 site is an OREPA block: raw kernels ``weight_orepa_{origin,
# avg_conv, pfir_conv, 1x1_kxk_idconv1, 1x1_kxk_conv2, 1x1, gconv_dw, gconv_pw}``, ``vector`` (6, O) (our ``scale``,
# rows in our branch order), one ``bn`` (our ``post_bn``), and fixed buffers (``weight_orepa_avg_avg`` = 1/k^2,
# ``weight_orepa_prior`` = the frequency prior, ``id_tensor`` = the identity the 1x1-kxk's first 1x1 is a difference
# from) which our blocks rebuild: each is checked against ours, then dropped. A 1x1 site (Bottleneck conv1 / conv3 /
# projection) is a Rep-1x1 (``weight_or1x1_origin``, ``weight_or1x1_l2i_conv1`` / ``_conv2``, ``vector`` (2, O),
# ``bn``); a BasicBlock projection stays ConvBN. The 7x7 stem is ``stage0.conv1.weight{0,1,2}`` (three OREPA blocks
# without BN) and ``stage0.conv1.bn``. OREPA-VGG (``-t OREPA_VGG``): ``rbr_dense`` the same kernels named
# ``weight_rbr_*`` with no plain 1x1 and a ``vector`` whose sixth row (where the block has an identity) is created
# uninitialised and never used (dropped), ``rbr_1x1`` ConvBN, ``rbr_identity`` BN. Deploy: ``orepa_reparam``,
# ``or1x1_reparam``, ``or_large_reparam``, ``rbr_reparam``, ``dbb_reparam`` or a ConvBN's biased ``conv``. ``-t base``
# and ``-t DBB`` files (ConvBN, the DBB repo's DBB) read as the ``dbb`` source's; RepVGG blocks as the ``repvgg``'s.
_OREPA_WEIGHTS = {"origin": "branches.origin.weight", "avg_conv": "branches.avg.conv1x1",
                  "pfir_conv": "branches.prior.conv1x1", "1x1_kxk_idconv1": "branches.1x1_kxk.first",
                  "1x1_kxk_conv2": "branches.1x1_kxk.second", "1x1": "branches.1x1.weight",
                  "gconv_dw": "branches.dw_pw.depthwise", "gconv_pw": "branches.dw_pw.pointwise",
                  "or1x1_origin": "branches.origin.weight", "or1x1_l2i_conv1": "branches.1x1_kxk.first",
                  "or1x1_l2i_conv2": "branches.1x1_kxk.second"}
_OREPA_FIXED = r"weight_(orepa|rbr)_(avg_avg|prior)|id_tensor"  # buffers our blocks rebuild: checked, then dropped
_OREPA_DEPLOY = r"(orepa_reparam|or1x1_reparam|or_large_reparam|rbr_reparam|dbb_reparam|conv)\.(weight|bias)"
DROP = "<checked and dropped>"


def _orepa_part(rest: str) -> str | None:
    """Our name, within one OREPA / Rep-1x1 block, of a key's rest."""
    if re.fullmatch(_OREPA_FIXED, rest):
        return DROP
    found = re.fullmatch(r"weight_(?:orepa_|rbr_|(?=or1x1_))(\w+)", rest)
    if found:
        return _OREPA_WEIGHTS.get(found.group(1))
    if rest == "vector":
        return "scale"
    return "post_bn." + rest[len("bn."):] if re.fullmatch(r"bn\.\w+", rest) else None


def _orepa_key(key: str, arch: str, rep: str, target: dict, form: str) -> str | None:
    if rep in ("none", "dbb") and not arch.startswith("repvgg"):
        return _dbb_key(key, arch, rep, target, form)
    if rep in ("none", "repvgg"):
        return (_repopt_key if rep == "none" else _repvgg_key)(key, arch, rep, target, form)
    if key.startswith("linear."):
        return "fc." + key[len("linear."):]
    site = _vgg_site(key) if rep == "orepa_vgg" else _dbb_site(key, arch)
    if site is None:
        return None
    prefix, rest = site
    if form == "deploy":
        found = re.fullmatch(_OREPA_DEPLOY, rest)
        return prefix + found.group(2) if found else None
    if rep == "orepa_vgg":
        for part, ours in (("rbr_1x1.", "blocks.conv1x1."), ("rbr_identity.", "blocks.identity.norms.identity.")):
            if rest.startswith(part):
                return prefix + ours + rest[len(part):]
        if not rest.startswith("rbr_dense."):
            return None
        prefix, rest = prefix + "blocks.dense.", rest[len("rbr_dense."):]
    if re.fullmatch(r"conv\.weight|bn\.\w+", rest) and prefix + rest in target:  # a ConvBN: our names
        return prefix + rest
    if prefix == "stem." and (found := re.fullmatch(r"weight([0-2])\.(.*)", rest)):  # the deep stem's three layers
        prefix, rest = f"stem.layers.{found.group(1)}.", found.group(2)
    part = _orepa_part(rest)
    return part if part in (None, DROP) else prefix + part


def _flip_sign(channels: int) -> Tensor:
    """(-1)^f per output channel, f the frequency index of the channel's prior filter (first half along the height,
    second half along the width): the frequency prior flipped spatially is the prior times this sign."""
    c, half = torch.arange(channels), channels // 2
    f = torch.where(c < half, c + 1, c + 1 - half)
    return 1.0 - 2.0 * (f % 2).to(torch.get_default_dtype())


def _orepa_tensor(key: str, value: Tensor, state: dict[str, Tensor], target: Tensor | None) -> Tensor:
    """The file's tensor as our parameter (``target``: ours, None for a dropped buffer, which is checked here).

    Two OREPA layouts are not ours up to names (the issue, and OREPA issue #9):
    * ResNeXt's dw-pw branch reads its grouped pointwise rows in the order (row within group) x groups + group, not
      group x rows-per-group + row: our row n is the file's row (n mod O/g) * g + n div (O/g);
    * the deep stem composes its three 3x3 kernels by correlating the first with the next (``conv2d`` on the kernels),
      which equals the composition of convolutions only with the second and third kernels rotated by 180 degrees:
      those two layers load rotated (each branch's kxk factor; the prior filter is fixed, so its 1x1 row takes the
      sign the rotation gives the prior; avg and 1x1 are symmetric), and our exact composition then gives the file's
      7x7 kernel.
    """
    from .algebra import identity_kernel
    from .branches import frequency_prior

    if target is None:  # a fixed buffer: it must be what our block rebuilds
        if key.endswith("id_tensor"):
            expected = identity_kernel(value.shape[0], 1, value.shape[0] // value.shape[1], dtype=value.dtype)
        elif key.endswith("_avg_avg"):
            expected = torch.full_like(value, 1.0 / value.numel())
        else:
            expected = frequency_prior(value.shape[0], value.shape[-1]).to(value.dtype)
        if value.shape != expected.shape or not torch.allclose(value, expected, rtol=0, atol=1e-6):
            raise OfficialError(f"{key}: not the fixed tensor OREPA's code builds (a modified model?)")
        return value
    if key.endswith("rbr_dense.vector") and value.shape[0] > target.shape[0]:
        value = value[: target.shape[0]]  # OREPA-VGG's unused, uninitialised extra row
    if key.endswith("weight_orepa_gconv_pw"):
        groups = state[key.replace("gconv_pw", "gconv_dw")].shape[0] // value.shape[1]
        if groups > 1 and value.shape[0] % groups == 0:  # (another architecture's file fails the shape check)
            rows = value.shape[0] // groups
            n = torch.arange(value.shape[0])
            value = value[(n % rows) * groups + n // rows]
    if re.match(r"stage0\.conv1\.weight[12]\.", key):
        if key.endswith(("_origin", "_1x1_kxk_conv2", "_gconv_dw")):
            value = value.flip(-2, -1)
        elif key.endswith("_pfir_conv"):
            value = value * _flip_sign(value.shape[0]).to(value.dtype).reshape(-1, 1, 1, 1)
    return value


MAPPERS = {"orepa": _orepa_key, "repvgg": _repvgg_key, "dbb": _dbb_key, "repopt": _repopt_key}
TENSORS = {"orepa": _orepa_tensor}  # a source whose tensors need more than a new name
# what marks a file's deploy form: a converted block's name (a RepOpt-VGG target's conv has a bias only when fused)
DEPLOY_MARKERS = {"repvgg": ("rbr_reparam.",), "dbb": ("dbb_reparam.", "fused_conv."), "repopt": ("conv.bias",),
                  "orepa": ("orepa_reparam.", "or1x1_reparam.", "or_large_reparam.", "rbr_reparam.", "dbb_reparam.",
                            "conv.bias")}
MODEL_ONLY = {("repopt", "repopt"): ("scale_conv", "scale_1x1", "identity_in_mult")}  # (source, rep): never in a file


def official_form(state: dict, source: str) -> str:
    """``deploy`` when the file holds the converted (inference) form, else ``train``."""
    return "deploy" if any(marker in k for k in state for marker in DEPLOY_MARKERS[source]) else "train"


def map_official(state: dict[str, Tensor], source: str, target: dict[str, Tensor], arch: str = "", rep: str = "",
                 form: str = "train") -> dict[str, Tensor]:
    """``state`` (of ``arch`` / ``rep``, in ``form``) renamed to the keys of ``target`` (a model's state dict) and
    transformed where the source needs it, checked key by key and shape by shape. BN's ``num_batches_tracked``
    counters, which some files lack, are taken from ``target`` where absent."""
    mapper, tensor = MAPPERS[source], TENSORS.get(source)
    mapped, unplaced, mismatched = {}, [], []
    for key, value in state.items():
        new = mapper(key, arch, rep, target, form)
        if new == DROP:
            tensor(key, value, state, None)
            continue
        if new is None or new not in target:
            unplaced.append(key)
            continue
        if tensor is not None:
            value = tensor(key, value, state, target[new])
        if tuple(value.shape) != tuple(target[new].shape):
            mismatched.append(f"{key} {tuple(value.shape)} (the model's {new}: {tuple(target[new].shape)})")
        else:
            mapped[new] = value.to(target[new].dtype)
    if unplaced:
        raise OfficialError(f"{len(unplaced)} key(s) of the file have no place in the model: "
                            + ", ".join(unplaced[:3]) + (", ..." if len(unplaced) > 3 else ""))
    if mismatched:
        raise OfficialError(f"{len(mismatched)} tensor(s) differ in shape (another architecture?): "
                            + "; ".join(mismatched[:2]) + ("; ..." if len(mismatched) > 2 else ""))
    own = ("num_batches_tracked", *MODEL_ONLY.get((source, rep), ()))
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
    state = read_official(path)
    head = state.get("linear.weight")
    if head is None or head.dim() != 2:
        raise OfficialError(f"{path}: no classifier ('linear.weight') in the file")
    model = build_classifier(arch, rep, variant=variant, num_classes=head.shape[0]).eval()
    form = official_form(state, source)
    if form == "deploy":
        model = deploy(model)
    model.load_state_dict(map_official(state, source, model.state_dict(), arch, rep, form), strict=True)
    return model.eval()
