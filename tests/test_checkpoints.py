"""Checkpoints: round trips in train and deploy form, strict loading, loud failures on any mismatch."""

import pytest
import torch

from backbones import CheckpointError, build_classifier, deploy, load_checkpoint, save_checkpoint
from conftest import randomize


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("arch,rep", [("resnet18", "orepa"), ("resnet50", "dbb"), ("repvgg_a0", "orepa_vgg")])
def test_round_trip_train_and_deploy_form(tmp_path, arch, rep):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = randomize(build_classifier(arch, rep, num_classes=10))
    expected = outputs(model, x)
    save_checkpoint(model, tmp_path / "train.pth", note="round trip")
    fresh = build_classifier(arch, rep, num_classes=10)
    meta = load_checkpoint(fresh, tmp_path / "train.pth")
    assert meta["form"] == "train" and meta["meta"] == {"note": "round trip"} and meta["arch"] == arch
    assert torch.equal(outputs(fresh, x), expected)

    deploy(model)
    save_checkpoint(model, tmp_path / "deploy.pth")
    fresh_deploy = deploy(build_classifier(arch, rep, num_classes=10))
    assert load_checkpoint(fresh_deploy, tmp_path / "deploy.pth")["form"] == "deploy"
    torch.testing.assert_close(outputs(fresh_deploy, x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_form_mismatch_fails_loudly_and_leaves_the_model_untouched(tmp_path):
    model = build_classifier("resnet18", "orepa", num_classes=10)
    save_checkpoint(deploy(build_classifier("resnet18", "orepa", num_classes=10)), tmp_path / "deploy.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="deploy-form checkpoint but the model is in train form"):
        load_checkpoint(model, tmp_path / "deploy.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    save_checkpoint(model, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="train-form checkpoint"):
        load_checkpoint(deploy(build_classifier("resnet18", "orepa", num_classes=10)), tmp_path / "train.pth")


def test_bare_state_dict_form_is_detected(tmp_path):
    model = build_classifier("resnet18", "dbb", num_classes=10)
    torch.save(deploy(build_classifier("resnet18", "dbb", num_classes=10)).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="deploy-form"):
        load_checkpoint(model, tmp_path / "bare.pth")
    load_checkpoint(deploy(model), tmp_path / "bare.pth")


@pytest.mark.parametrize("other", [("resnet34", "orepa", 10), ("resnet18", "dbb", 10), ("resnet18", "orepa", 7)])
def test_other_architecture_fails(tmp_path, other):
    save_checkpoint(build_classifier("resnet18", "orepa", num_classes=10), tmp_path / "a.pth")
    with pytest.raises(CheckpointError):
        load_checkpoint(build_classifier(*other[:2], num_classes=other[2]), tmp_path / "a.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = build_classifier("resnet18", "none", num_classes=10)
    state = model.state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=r"missing \[fc.bias\].*unexpected \[extra.weight\]"):
        load_checkpoint(build_classifier("resnet18", "none", num_classes=10), tmp_path / "edited.pth")


def test_corrupt_and_missing_files(tmp_path):
    model = build_classifier("resnet18", "none", num_classes=10)
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, tmp_path / "corrupt.pth")
    save_checkpoint(model, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, tmp_path / "truncated.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(model, tmp_path / "absent.pth")


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is refused, not executed."""
    import pickle
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth", pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(build_classifier("resnet18", "none", num_classes=10), tmp_path / "evil.pth")
