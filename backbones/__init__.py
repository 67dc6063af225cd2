"""repbench backbones: the re-parameterization algebra, blocks, networks, deploy conversion and checkpoints.

Public interface: :func:`build_classifier`, :func:`deploy`, :func:`save_checkpoint`, :func:`load_checkpoint`.
``backbones.MODELS`` is the MMEngine registry (scope ``repbench``) holding ``repbench.ResNet`` and
``repbench.RepVGG`` for MMDetection / MMSegmentation configs (``custom_imports=dict(imports=["backbones"])``).
"""

from .blocks import ReparamBlock
from .deploy import CheckpointError, deploy, form_of, load_checkpoint, read_checkpoint, save_checkpoint
from .mm import MODELS
from .networks import ARCHS, build_classifier
from .variants import PRESETS, RepConfig, resolve_variant

__all__ = ["ARCHS", "MODELS", "PRESETS", "CheckpointError", "RepConfig", "ReparamBlock", "build_classifier", "deploy",
           "form_of", "load_checkpoint", "read_checkpoint", "resolve_variant", "save_checkpoint"]
