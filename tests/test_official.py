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


def tiny_image_folder(root, classes=2, per_class=2):
    """A validation ImageFolder: ``classes`` class folders of random 64x48 JPEGs."""
    from PIL import Image
    g = torch.Generator().manual_seed(5)
    for c in range(classes):
        (root / f"n0000000{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (255 * torch.rand(48, 64, 3, generator=g)).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"n0000000{c}" / f"{i}.JPEG")
    return root


def test_evaluate_stores_published_weights_and_the_report_shows_them(tmp_path):
    """``run_suite evaluate`` on a tiny ImageFolder with a converted (deploy-form) RepVGG-A0 file stores a run of
    repbench.published with the file's sha256 and source; OREPA Table 4's report shows its top-1 as "published
    weights" in the RepVGG-A0/RepVGG row only (same arch, rep and variant).

    The same table4 run (one row, smoke) asks for the quantization column (``--quantize``, runners/quant.py): the
    trained model is deployed, quantized and measured; the run stores INT8 top-1 with its calibration count and
    quantizer, the drop from the deployed float model on the same images, and the INT8 and float latency on one
    execution path (both compiled), timed interleaved, whose ratio is their per-step ratio; the report shows the
    quantization family."""
    import hashlib
    import re
    import sqlite3

    from test_cli import run_cli
    images = tiny_image_folder(tmp_path / "val")
    torch.save(official_repvgg_state(True), tmp_path / "RepVGG-A0-deploy.pth")
    db = tmp_path / "db.sqlite"
    where = ("--db", f"sqlite:///{db}", "--artifacts", str(tmp_path / "art"))
    done = run_cli("evaluate", "--checkpoint", str(tmp_path / "RepVGG-A0-deploy.pth"), "--source", "repvgg", "--arch",
                   "repvgg_a0", "--rep", "repvgg", "--images", str(images), *where, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sha = hashlib.sha256((tmp_path / "RepVGG-A0-deploy.pth").read_bytes()).hexdigest()
    with sqlite3.connect(db) as c:
        (top1, method), = c.execute("SELECT m.value, m.method FROM metrics m JOIN runs r ON m.run_id = r.id WHERE "
                                    "r.table_name = 'repbench.published' AND m.name = 'top1'").fetchall()
        assert c.execute("SELECT sha256 FROM artifacts WHERE kind = 'input_weights'").fetchall() == [(sha,)]
        params = dict(c.execute("SELECT key, value FROM params"))
    assert top1 in (0.0, 25.0, 50.0, 75.0, 100.0) and "on 4 images" in method and "deploy form" in method
    assert params["published.source"] == '"repvgg"' and params["published.sha256"] == f'"{sha}"'
    assert run_cli("table4", "--only", "RepVGG-A0/RepVGG", "--quantize", *where, "--data-root",
                   str(tmp_path / "data"), cwd=tmp_path).returncode == 0
    assert run_cli("report", "table4", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"),
                   cwd=tmp_path).returncode == 0
    md = (tmp_path / "out" / "orepa.table4.md").read_text()
    accuracy = md.split("### Accuracy")[1].split("###")[0]
    header = next(line for line in accuracy.splitlines() if line.startswith("| row"))
    assert "Top-1 acc published weights" in header
    column = [c.strip() for c in header.split("|")].index("Top-1 acc published weights")
    cells = {line.split("|")[1].strip(): line.split("|")[column].strip()
             for line in accuracy.splitlines() if line.startswith("| ") and not line.startswith("| row")}
    assert cells["RepVGG-A0/RepVGG"] == f"{top1:.2f} (repvgg)" and cells["ResNet-18/None"] == "–"

    with sqlite3.connect(db) as c:  # the quantization column
        got = {name: (value, method, dtype) for name, value, method, dtype in c.execute(
            "SELECT m.name, m.value, m.method, m.dtype FROM metrics m JOIN runs r ON m.run_id = r.id "
            "WHERE r.table_name = 'orepa.table4'")}
    top1, top1_int8, drop = got["top1"][0], got["top1_ptq"][0], got["top1_ptq_drop"][0]
    assert 0 <= top1_int8 <= 100 and -100 <= drop <= 100
    assert re.search(r"calibration_images \d+,", got["top1_ptq"][1]) and "X86InductorQuantizer" in got["top1_ptq"][1]
    assert "HistogramObserver" in got["top1_ptq"][1] and got["top1_ptq"][2] == "int8"
    assert f"({top1:.2f})" in got["top1_ptq_drop"][1]  # the training run's float top-1 on the same val images
    int8, fp32 = got["latency_int8"], got["latency_compiled_fp32"]
    assert int8[0] > 0 and fp32[0] > 0 and int8[2] == "int8" and fp32[2] == "float32"
    assert "torch.compile" in int8[1] and "torch.compile" in fp32[1] and "interleaved" in int8[1]
    assert got["latency_int8_ratio"][0] == pytest.approx(int8[0] / fp32[0])  # one timed pair at smoke
    line = next(line for line in md.split("### Quantization")[1].splitlines() if line.startswith("| RepVGG-A0/RepVGG"))
    assert f"| {got['latency_int8_ratio'][0]:.3g}x |" in line


@pytest.mark.parametrize("case", ["wrong-arch", "truncated", "extra-key"])
def test_evaluate_refuses_a_file_it_cannot_map_with_one_line(tmp_path, capsys, case):
    """Another architecture's file, a truncated file, a file with an extra key: one line, exit 2, no database."""
    from runners.cli import main
    images = tiny_image_folder(tmp_path / "val", classes=1, per_class=1)
    state = official_repvgg_state(False)
    path = tmp_path / "file.pth"
    if case == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        torch.save({**state, "stage1.0.rbr_dense.extra": torch.zeros(1)} if case == "extra-key" else state, path)
    arch = "repvgg_a1" if case == "wrong-arch" else "repvgg_a0"
    code = main(["evaluate", "--checkpoint", str(path), "--source", "repvgg", "--arch", arch, "--rep", "repvgg",
                 "--images", str(images), "--db", f"sqlite:///{tmp_path / 'db.sqlite'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("run_suite: error: --checkpoint:")
    assert not (tmp_path / "db.sqlite").exists()
