"""Probes on a tiny model return sane values with units; memory caps turn OOM into a result; NaN -> diverged."""

import math

import pytest
import torch
from torch import nn

from backbones import build_classifier, deploy
from runners import probes


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def test_train_time_probe():
    m = probes.probe_train_time(tiny(), batch=4, resolution=16, num_classes=4, warmup=1, steps=5)
    assert m.unit == "s" and 0 < m.value < 5
    assert m.extra["time_per_batch_iqr"] >= 0
    assert "median of 5" in m.method and "1 warm-up" in m.method


def test_train_memory_probe_grows_with_batch():
    small = probes.probe_train_memory(tiny, 2, 32, 4, cap_gb=4)
    large = probes.probe_train_memory(tiny, 256, 32, 4, cap_gb=4)
    assert small.unit == "GiB" and not small.oom and small.value > 0
    assert large.value > small.value  # activations of 256 images outweigh those of 2
    assert large.extra["train_memory_step"] > small.extra["train_memory_step"]
    assert "VmHWM" in small.method and ("cgroup" in small.method or "RLIMIT_AS" in small.method)


def test_oom_under_the_cap_is_a_result():
    m = probes.probe_train_memory(lambda: build_classifier("resnet18", "dbb", num_classes=10), 64, 224, 10,
                                  cap_gb=0.5)
    assert m.oom and m.value is None and "OOM at budget 0.5 GiB" in m.method


def test_max_batch_size_is_bounded_and_monotone():
    m = probes.probe_max_batch_size(tiny, 64, 4, cap_gb=0.4, low=1, high=512)
    assert m.unit == "images" and 1 <= m.value <= 512


def test_params_and_macs_of_resnet18():
    results = {m.name: m for m in probes.probe_params_macs(lambda: build_classifier("resnet18", "orepa"), deploy)}
    assert results["params_deploy"].value == 11_684_712
    assert results["params_train"].value > results["params_deploy"].value
    # torchvision-layout ResNet-18 at 224: 1.81 GMACs (conv + fc multiply-adds)
    assert round(results["macs_deploy"].value / 1e9, 2) == 1.81
    assert results["macs_train"].value > results["macs_deploy"].value  # online kernel composition counted


def test_inference_probe():
    latency, throughput = probes.probe_inference(tiny(), 16, latency_batch=1, throughput_batch=8, steps=3)
    assert latency.unit == "s" and 0 < latency.value < 5
    assert throughput.unit == "img/s" and throughput.value > 0
    assert "batch 1" in latency.method and "batch 8" in throughput.method


def test_nan_loss_is_diverged(tmp_path):
    from runners.train import Diverged, train_classifier
    from suites import Recipe
    recipe = Recipe(dataset="synthetic", resolution=32, batch=2, epochs=1, max_iters=3, lr=1e30)
    with pytest.raises(Diverged) as info:
        train_classifier(build_classifier("resnet18", "orepa", num_classes=4, variant="no_post_norm"), recipe,
                         tmp_path)
    assert info.value.step >= 1 and not math.isfinite(info.value.loss)
