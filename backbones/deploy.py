"""Deploy conversion and checkpoints in train or deploy form."""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .blocks import ReparamBlock

CHECKPOINT_FORMAT = "repbench-checkpoint-v1"


def deploy(model: nn.Module, shortcut: bool = False, pointwise_as_linear: bool = False) -> nn.Module:
    """Replace every :class:`ReparamBlock` in ``model`` by the ``nn.Conv2d`` it is equivalent to, in place; a module
    with a ``deployed(shortcut=..., pointwise_as_linear=...)`` method (RepNeXt's blocks and head,
    backbones/repnext.py) by the module that method returns.

    ``shortcut``: RepNeXt's shortcut re-parameterization (sRep) on top of the regular one (rRep);
    ``pointwise_as_linear``: rRep with RepNeXt's pointwise convs as Linear layers (its Table 4's throughput form).
    Either on a model without such blocks is a ValueError. Idempotent (a deployed model has no blocks left).
    Returns ``model``, or the conv if ``model`` itself is a block.
    """
    from .repnext import NeXtBlock
    if (shortcut or pointwise_as_linear) and not any(isinstance(m, NeXtBlock) for m in model.modules()):
        raise ValueError("shortcut / pointwise_as_linear deploy RepNeXt-style blocks; this model has none")
    return _deploy(model, dict(shortcut=shortcut, pointwise_as_linear=pointwise_as_linear))


def _deploy(model: nn.Module, options: dict) -> nn.Module:
    if isinstance(model, ReparamBlock):
        return model.to_deploy()
    if callable(getattr(model, "deployed", None)):
        return model.deployed(**options)
    for name, child in list(model.named_children()):
        if isinstance(child, ReparamBlock) or callable(getattr(child, "deployed", None)):
            new = _deploy(child, options)
            new.train(child.training)
            setattr(model, name, new)
        else:
            _deploy(child, options)
    return model


def form_of(model: nn.Module) -> str:
    """``train`` if any re-param block is left, else ``deploy``."""
    return "train" if any(isinstance(m, ReparamBlock) for m in model.modules()) else "deploy"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the given model (corrupt, wrong form, wrong architecture)."""


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta) -> Path:
    """Save ``model``'s state dict with its form (train / deploy) and metadata (arch, rep, variant, ...).

    Written to a temporary file and renamed, so a crash never leaves a half-written checkpoint.
    Metadata must be plain data (it is read back with ``weights_only=True``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "form": form_of(model),
               "arch": getattr(model, "arch", None), "rep": getattr(model, "rep", None),
               "meta": meta, "state_dict": model.state_dict()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely (``weights_only=True``); a bare state dict is accepted with form unknown."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": None, "form": None, "arch": None, "rep": None, "meta": {}, "state_dict": obj}
    raise CheckpointError(f"{path} holds no state dict")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a checkpoint into ``model`` strictly.

    The checkpoint's form must match the model's (deploy the model first to load a deploy checkpoint); for a bare
    state dict the form is inferred from its keys. A DyRep-grown run's train-form weights carry the structure
    events they belong to (metadata ``events``): a plain model grows that structure first. Any missing or unexpected key, or shape mismatch, raises
    :class:`CheckpointError` and leaves ``model`` untouched. Returns the checkpoint's metadata.
    """
    return load_state(model, read_checkpoint(path), str(path))


def load_state(model: nn.Module, ckpt: dict, path: str) -> dict:
    """:func:`load_checkpoint` for an already-read checkpoint dict (see :func:`read_checkpoint`)."""
    model_form = form_of(model)
    state = ckpt["state_dict"]
    ckpt_form = ckpt["form"] or infer_form(state)
    if ckpt_form != model_form:
        raise CheckpointError(f"{path} is a {ckpt_form}-form checkpoint but the model is in {model_form} form"
                              + (" (call backbones.deploy(model) first)" if ckpt_form == "deploy" else ""))
    for key in ("arch", "rep"):
        want, got = getattr(model, key, None), ckpt[key]
        if key == "rep" and (got, want) == ("none", "dyrep"):
            continue  # DyRep starts as the plain network (same parameters): a plain run's weights are its start
        if want is not None and got is not None and want != got:
            raise CheckpointError(f"{path} was saved from {key}={got!r}, the model has {key}={want!r}")
    events = (ckpt.get("meta") or {}).get("events")
    if events and ckpt_form == "train" and set(state) != set(model.state_dict()):
        from .dyrep import rebuild  # a DyRep-grown run's weights: grow the plain model as the run did first
        trial = copy.deepcopy(model)
        try:
            rebuild(trial, events)
        except (KeyError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: its structure events do not apply to this model ({e})") from None
        if set(trial.state_dict()) == set(state):
            rebuild(model, events)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path} does not match the model: {_summary('missing', missing)}"
                              f"{_summary('unexpected', unexpected)}{_summary('shape mismatch', shapes)}")
    model.load_state_dict(state, strict=True)
    return {k: ckpt[k] for k in ("form", "arch", "rep", "meta")}


def infer_form(state: dict) -> str:
    """Every BN of our networks lives in a re-param block, so only a train-form state dict has BN statistics."""
    return "train" if any(key.endswith("running_mean") for key in state) else "deploy"


def _summary(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    return f"{len(keys)} {what} [{shown}]; "
