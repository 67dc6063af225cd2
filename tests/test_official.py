"""Published checkpoints (backbones/official.py): state dicts built here in the official repositories' layouts, with
the key names and shapes written out, converted, and the repbench model's eval output checked against a reference
computed directly from the official-layout tensors (the official block's definition, with F.conv2d / F.batch_norm).
"""

import pytest
import torch
import torch.nn.functional as F

from backbones.official import OfficialError, from_official

# RepVGG-A0 as DingXiaoH/RepVGG builds it: stage0 one block 3 -> min(64, 64 x 0.75) = 48, stride 2; stages 1-4 of
# 2, 4, 14, 1 blocks at 48, 96, 192, 1280 (= 512 x 2.5) channels, the first block of each stride 2.
A0 = ((1, 48), (2, 48), (4, 96), (14, 192), (1, 1280))
CLASSES = 10


def repvgg_blocks(stages=A0):
    """(key prefix, in, out, stride) of every block, in the official names (stage0, stage{i}.{j})."""
    blocks, cin = [], 3
    for i, (depth, width) in enumerate(stages):
        for j in range(depth):
            blocks.append(("stage0" if i == 0 else f"stage{i}.{j}", cin, width, 2 if j == 0 else 1))
            cin = width
    return blocks


def official_repvgg_state(deploy: bool, seed: int = 0, stages=A0) -> dict:
    """A random state dict in the official layout: training blocks (rbr_dense = conv3x3 + BN, rbr_1x1 = conv1x1 + BN,
    rbr_identity = BN where in == out and stride 1) or converted blocks (rbr_reparam, a conv3x3 with bias)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def bn(prefix, c):
        return {f"{prefix}.weight": rand(c, lo=0.5, hi=1.5), f"{prefix}.bias": rand(c, lo=-0.2, hi=0.2),
                f"{prefix}.running_mean": rand(c, lo=-0.2, hi=0.2), f"{prefix}.running_var": rand(c, lo=0.5, hi=2.0),
                f"{prefix}.num_batches_tracked": torch.tensor(7)}

    state = {}
    for p, cin, cout, stride in repvgg_blocks(stages):
        scale = (2.0 / (9 * cin)) ** 0.5
        if deploy:
            state |= {f"{p}.rbr_reparam.weight": scale * rand(cout, cin, 3, 3), f"{p}.rbr_reparam.bias": rand(cout) / 10}
            continue
        state |= {f"{p}.rbr_dense.conv.weight": scale * rand(cout, cin, 3, 3), **bn(f"{p}.rbr_dense.bn", cout),
                  f"{p}.rbr_1x1.conv.weight": scale * rand(cout, cin, 1, 1), **bn(f"{p}.rbr_1x1.bn", cout)}
        if cin == cout and stride == 1:
            state |= bn(f"{p}.rbr_identity", cin)
    return state | {"linear.weight": rand(CLASSES, stages[-1][1]) / 10, "linear.bias": rand(CLASSES) / 10}


def official_repvgg_forward(state: dict, x: torch.Tensor, deploy: bool, stages=A0) -> torch.Tensor:
    """The official RepVGG's eval forward, from its tensors: per block ReLU(BN(conv3x3) + BN(conv1x1) + BN(x)), or
    ReLU(conv3x3 + bias) converted; global average pool; linear."""
    def bn(t, p):
        return F.batch_norm(t, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], False, 0.0, 1e-5)

    for p, cin, cout, stride in repvgg_blocks(stages):
        if deploy:
            x = F.relu(F.conv2d(x, state[f"{p}.rbr_reparam.weight"], state[f"{p}.rbr_reparam.bias"], stride, 1))
            continue
        y = bn(F.conv2d(x, state[f"{p}.rbr_dense.conv.weight"], None, stride, 1), f"{p}.rbr_dense.bn") \
            + bn(F.conv2d(x, state[f"{p}.rbr_1x1.conv.weight"], None, stride, 0), f"{p}.rbr_1x1.bn")
        if f"{p}.rbr_identity.weight" in state:
            y = y + bn(x, f"{p}.rbr_identity")
        x = F.relu(y)
    return F.linear(x.mean((2, 3)), state["linear.weight"], state["linear.bias"])


@pytest.mark.parametrize("wrap,deploy", [("bare", False), ("state_dict", True), ("model+ddp", False)])
def test_repvgg_official_files_load_exactly(tmp_path, deploy, wrap):
    """A RepVGG-A0 file in the official layout (training blocks, or converted by the repo's tool), saved bare, under
    'state_dict', or under 'model' with DDP's 'module.' prefix: the loaded model is in the file's form and its eval
    output equals the official forward computed from the file's tensors (1e-5 relative, float32)."""
    state = official_repvgg_state(deploy)
    saved = {"bare": state, "state_dict": {"state_dict": state, "epoch": torch.tensor(120)},
             "model+ddp": {"model": {f"module.{k}": v for k, v in state.items()}}}[wrap]
    torch.save(saved, tmp_path / "official.pth")
    model = from_official(tmp_path / "official.pth", "repvgg_a0", "repvgg", "repvgg")
    assert not model.training and model.fc.out_features == CLASSES
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, reference = model(x), official_repvgg_forward(state, x, deploy)
    assert float((out - reference).norm() / reference.norm()) <= 1e-5
    assert (sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in state.items()
                                                               if not k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked"))))


def test_files_that_do_not_map_fully_are_refused(tmp_path):
    """Another architecture's file (RepVGG-A1 widths into A0), a truncated file and a file with an extra key are each
    refused, naming what is wrong; a source whose mapping is not built is refused by name."""
    a1 = official_repvgg_state(False, stages=((1, 64), (2, 64), (4, 128), (14, 256), (1, 1280)))
    torch.save(a1, tmp_path / "a1.pth")
    with pytest.raises(OfficialError, match=r"differ in shape \(another architecture\?\): stage0.rbr_dense"):
        from_official(tmp_path / "a1.pth", "repvgg_a0", "repvgg", "repvgg")
    state = official_repvgg_state(False)
    torch.save(state, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(OfficialError, match="cannot read"):
        from_official(tmp_path / "cut.pth", "repvgg_a0", "repvgg", "repvgg")
    torch.save({**state, "stage2.0.rbr_dense.extra": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(OfficialError, match="1 key.* no place in the model: stage2.0.rbr_dense.extra"):
        from_official(tmp_path / "extra.pth", "repvgg_a0", "repvgg", "repvgg")
    torch.save({k: v for k, v in state.items() if not k.startswith("stage4.")}, tmp_path / "short.pth")
    with pytest.raises(OfficialError, match="not in the file"):
        from_official(tmp_path / "short.pth", "repvgg_a0", "repvgg", "repvgg")
    with pytest.raises(OfficialError, match="'orepa': its mapping is not built yet"):
        from_official(tmp_path / "good.pth", "resnet18", "orepa", "orepa")
