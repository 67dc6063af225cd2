"""Shared helpers: DESIGN.md's error measure, tolerances and randomised BN statistics."""

import pytest
import torch

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (DESIGN.md, correctness rules)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model: torch.nn.Module, generator_seed: int = 0) -> torch.nn.Module:
    """Randomised BN statistics as DESIGN.md defines them, and every zero- or constant-initialised parameter
    (identity-based 1x1s, the prior branch's 0.0 scale) perturbed so that each branch contributes."""
    g = torch.Generator().manual_seed(generator_seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                uniform(m.running_mean, -0.1, 0.1)
                uniform(m.running_var, 0.5, 1.5)
                uniform(m.weight, 0.5, 1.5)
                uniform(m.bias, -0.1, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                uniform(p, 0.1, 1.0)
            elif name.endswith("first") and not p.abs().sum():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request):
    return request.param
