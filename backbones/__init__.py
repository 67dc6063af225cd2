"""repbench backbones: the re-parameterization algebra, blocks, networks, deploy conversion and checkpoints.

Public interface: :func:`build_classifier`, :func:`deploy`, :func:`save_checkpoint`, :func:`load_checkpoint`.
(The MMEngine registry ``backbones.MODELS`` is created lazily, so the zoo imports without the OpenMMLab stack.)
"""

from .blocks import ReparamBlock
from .deploy import CheckpointError, deploy, form_of, load_checkpoint, read_checkpoint, save_checkpoint
from .networks import ARCHS, build_classifier
from .variants import PRESETS, RepConfig, resolve_variant

__all__ = ["ARCHS", "PRESETS", "CheckpointError", "RepConfig", "ReparamBlock", "build_classifier", "deploy",
           "form_of", "load_checkpoint", "read_checkpoint", "resolve_variant", "save_checkpoint"]
