"""Published checkpoints (backbones/official.py): state dicts built here in the official repositories' layouts, with
the key names and shapes written out, converted, and the repbench model's eval output checked against a reference
computed directly from the official-layout tensors (the official block's definition, with F.conv2d / F.batch_norm).
"""

import math

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
    with pytest.raises(OfficialError, match="unknown source 'acnet'"):
        from_official(tmp_path / "good.pth", "repvgg_a0", "repvgg", "acnet")


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


def test_evaluate_on_two_processes_counts_every_image_once(tmp_path):
    """``run_suite evaluate --devices 2``: two processes (DDP over gloo) each evaluate every other image of 5 and
    sum their counts; the stored top-1 is the one computed here in one process on the same images."""
    import sqlite3

    from runners.evaluate import EVAL_CROP, image_folder

    from test_cli import run_cli
    images = tiny_image_folder(tmp_path / "val", classes=2, per_class=3)
    next((images / "n00000001").iterdir()).unlink()  # 5 images: the shards are 3 and 2
    torch.save(official_repvgg_state(True), tmp_path / "A0.pth")
    db = tmp_path / "db.sqlite"
    done = run_cli("evaluate", "--checkpoint", str(tmp_path / "A0.pth"), "--source", "repvgg", "--arch", "repvgg_a0",
                   "--rep", "repvgg", "--images", str(images), "--devices", "2", "--db", f"sqlite:///{db}",
                   "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(db) as c:
        (top1, method), = c.execute("SELECT value, method FROM metrics WHERE name = 'top1'").fetchall()
    model = from_official(tmp_path / "A0.pth", "repvgg_a0", "repvgg", "repvgg")
    data = image_folder(images, EVAL_CROP["repvgg"])
    with torch.no_grad():
        hits = sum(int(model(x[None]).argmax(1)) == y for x, y in data)
    assert top1 == pytest.approx(100 * hits / 5) and "on 5 images" in method and "2 processes" in method


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


# -- DBB / ACB (DingXiaoH/DiverseBranchBlock): ResNet-18 with DBB or ACB, MobileNetV1 with DBB ------------------------
# Only 3x3 convs become blocks (1x1 and 7x7 stay ConvBN: ``conv.weight`` + ``bn.*``). A DBB site P: dbb_origin.conv /
# .bn; dbb_1x1.conv / .bn (dense only); dbb_avg.conv + BNAndPad dbb_avg.bn.bn (dense only), dbb_avg.avgbn;
# dbb_1x1_kxk.idconv1 (dense: a difference from the identity) or .conv1 (depthwise, 2x channels), BNAndPad
# dbb_1x1_kxk.bn1.bn, .conv2, .bn2. An ACB site: square_conv / square_bn, ver_conv (k x 1) / ver_bn, hor_conv (1 x k)
# / hor_bn. Deploy: P.dbb_reparam / P.fused_conv / a ConvBN's P.conv, weight and bias.
MOBILENET = [32, 32, 64, 64, 128, 128, 128, 128, 256, 256, 256, 256, 512] + [512] * 10 + [512, 1024, 1024, 1024]


def _bn_shapes(p, c):
    return {f"{p}.{s}": (c,) for s in ("weight", "bias", "running_mean", "running_var")} | {
        f"{p}.num_batches_tracked": ()}


def _site_shapes(kind, p, i, o, k, g=1, deploy=False):
    if deploy:
        name = "conv" if k != 3 else {"dbb": "dbb_reparam", "acb": "fused_conv"}[kind]
        return {f"{p}.{name}.weight": (o, i // g, k, k), f"{p}.{name}.bias": (o,)}
    if k != 3:
        return {f"{p}.conv.weight": (o, i // g, k, k)} | _bn_shapes(f"{p}.bn", o)
    if kind == "acb":
        return {f"{p}.square_conv.weight": (o, i // g, 3, 3), f"{p}.ver_conv.weight": (o, i // g, 3, 1),
                f"{p}.hor_conv.weight": (o, i // g, 1, 3)} | _bn_shapes(f"{p}.square_bn", o) | \
            _bn_shapes(f"{p}.ver_bn", o) | _bn_shapes(f"{p}.hor_bn", o)
    t = i if g < o else 2 * i
    out = {f"{p}.dbb_origin.conv.weight": (o, i // g, 3, 3), **_bn_shapes(f"{p}.dbb_origin.bn", o),
           **_bn_shapes(f"{p}.dbb_avg.avgbn", o),
           f"{p}.dbb_1x1_kxk.{'idconv1' if t == i else 'conv1'}.weight": (t, i // g, 1, 1),
           **_bn_shapes(f"{p}.dbb_1x1_kxk.bn1.bn", t), f"{p}.dbb_1x1_kxk.conv2.weight": (o, t // g, 3, 3),
           **_bn_shapes(f"{p}.dbb_1x1_kxk.bn2", o)}
    if g < o:
        out |= {f"{p}.dbb_1x1.conv.weight": (o, i // g, 1, 1), **_bn_shapes(f"{p}.dbb_1x1.bn", o),
                f"{p}.dbb_avg.conv.weight": (o, i // g, 1, 1), **_bn_shapes(f"{p}.dbb_avg.bn.bn", o)}
    return out


def official_dbb_shapes(kind, arch, deploy=False):
    """Key -> shape of an official ResNet-18 (stage0.conv1, stage{s}.{j}.conv1/conv2/shortcut, linear) or MobileNetV1
    (conv1, stem.{i}.depthwise / .pointwise, linear) file with DBB or ACB blocks."""
    shapes = {}
    if arch == "resnet18":
        shapes |= _site_shapes(kind, "stage0.conv1", 3, 64, 7, deploy=deploy)
        cin = 64
        for s in range(1, 5):
            planes = 64 * 2 ** (s - 1)
            for j in range(2):
                p, stride = f"stage{s}.{j}", 2 if j == 0 and s > 1 else 1
                if stride != 1 or cin != planes:
                    shapes |= _site_shapes(kind, f"{p}.shortcut", cin, planes, 1, deploy=deploy)
                shapes |= _site_shapes(kind, f"{p}.conv1", cin, planes, 3, deploy=deploy)
                shapes |= _site_shapes(kind, f"{p}.conv2", planes, planes, 3, deploy=deploy)
                cin = planes
    else:
        shapes |= _site_shapes(kind, "conv1", 3, 32, 3, deploy=deploy)
        for i in range(13):
            c, out = MOBILENET[2 * i + 1], MOBILENET[2 * i + 2]
            shapes |= _site_shapes(kind, f"stem.{i}.depthwise", c, c, 3, g=c, deploy=deploy)
            shapes |= _site_shapes(kind, f"stem.{i}.pointwise", c, out, 1, deploy=deploy)
        cin = 1024
    return shapes | {"linear.weight": (CLASSES, cin), "linear.bias": (CLASSES,)}


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith(("running_var", "bn.weight", "bn1.bn.weight", "bn2.weight", "avgbn.weight",
                           "_bn.weight")):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 4:
            state[key] = torch.randn(shape, generator=g) * (1.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        else:
            state[key] = 0.2 * torch.randn(shape, generator=g)
    return state


def _bn(state, p, x):
    return F.batch_norm(x, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                        state[f"{p}.bias"], False, 0.0, 1e-5)


def _bn_pad(state, p, x):
    """BN, then a 1-pixel border of the BN's response to zero (DBB's BNAndPad: the chain stays mergeable)."""
    y = _bn(state, p, x)
    zero = state[f"{p}.bias"] - state[f"{p}.running_mean"] * state[f"{p}.weight"] / (state[f"{p}.running_var"]
                                                                                       + 1e-5).sqrt()
    out = zero.view(1, -1, 1, 1).expand(y.shape[0], -1, y.shape[2] + 2, y.shape[3] + 2).clone()
    out[:, :, 1:-1, 1:-1] = y
    return out


def official_dbb_site(state, p, x, stride, g=1):
    """One conv site's output from the official tensors (the DBB paper's six transforms read as branches)."""
    if f"{p}.conv.weight" in state or f"{p}.conv.bias" in state:  # ConvBN (train) or a deployed conv
        w = state[f"{p}.conv.weight"]
        y = F.conv2d(x, w, state.get(f"{p}.conv.bias"), stride, w.shape[-1] // 2, 1, g)
        return y if f"{p}.conv.bias" in state else _bn(state, f"{p}.bn", y)
    for name in ("dbb_reparam", "fused_conv"):
        if f"{p}.{name}.weight" in state:
            return F.conv2d(x, state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"], stride, 1, 1, g)
    if f"{p}.square_conv.weight" in state:  # ACB: square + vertical + horizontal
        return _bn(state, f"{p}.square_bn", F.conv2d(x, state[f"{p}.square_conv.weight"], None, stride, 1, 1, g)) \
            + _bn(state, f"{p}.ver_bn", F.conv2d(x, state[f"{p}.ver_conv.weight"], None, stride, (1, 0), 1, g)) \
            + _bn(state, f"{p}.hor_bn", F.conv2d(x, state[f"{p}.hor_conv.weight"], None, stride, (0, 1), 1, g))
    y = _bn(state, f"{p}.dbb_origin.bn", F.conv2d(x, state[f"{p}.dbb_origin.conv.weight"], None, stride, 1, 1, g))
    if f"{p}.dbb_1x1.conv.weight" in state:
        y = y + _bn(state, f"{p}.dbb_1x1.bn", F.conv2d(x, state[f"{p}.dbb_1x1.conv.weight"], None, stride, 0, 1, g))
        avg = F.avg_pool2d(_bn_pad(state, f"{p}.dbb_avg.bn.bn", F.conv2d(x, state[f"{p}.dbb_avg.conv.weight"], None,
                                                                         1, 0, 1, g)), 3, stride, 0)
    else:  # depthwise: average pooling of the input (zero padding counted)
        avg = F.avg_pool2d(x, 3, stride, 1)
    y = y + _bn(state, f"{p}.dbb_avg.avgbn", avg)
    first = state.get(f"{p}.dbb_1x1_kxk.idconv1.weight")
    if first is not None:  # the stored difference plus the identity (i, i mod in-per-group)
        identity = torch.zeros_like(first)
        identity[torch.arange(first.shape[0]), torch.arange(first.shape[0]) % first.shape[1]] = 1
        first = first + identity
    else:
        first = state[f"{p}.dbb_1x1_kxk.conv1.weight"]
    hidden = _bn_pad(state, f"{p}.dbb_1x1_kxk.bn1.bn", F.conv2d(x, first, None, 1, 0, 1, g))
    return y + _bn(state, f"{p}.dbb_1x1_kxk.bn2", F.conv2d(hidden, state[f"{p}.dbb_1x1_kxk.conv2.weight"], None,
                                                           stride, 0, 1, g))


def official_dbb_forward(state, arch, x):
    if arch == "resnet18":
        x = F.max_pool2d(F.relu(official_dbb_site(state, "stage0.conv1", x, 2)), 3, 2, 1)
        for s in range(1, 5):
            for j in range(2):
                p, stride = f"stage{s}.{j}", 2 if j == 0 and s > 1 else 1
                shortcut = official_dbb_site(state, f"{p}.shortcut", x, stride) if any(
                    k.startswith(f"{p}.shortcut.") for k in state) else x
                y = official_dbb_site(state, f"{p}.conv2", F.relu(official_dbb_site(state, f"{p}.conv1", x, stride)), 1)
                x = F.relu(y + shortcut)
    else:
        x = F.relu(official_dbb_site(state, "conv1", x, 2))
        for i in range(13):
            c, stride = MOBILENET[2 * i + 1], 2 if i in (1, 3, 5, 11) else 1
            x = F.relu(official_dbb_site(state, f"stem.{i}.depthwise", x, stride, g=c))
            x = F.relu(official_dbb_site(state, f"stem.{i}.pointwise", x, 1))
    return F.linear(x.mean((2, 3)), state["linear.weight"], state["linear.bias"])


@pytest.mark.parametrize("arch,rep,deploy", [("resnet18", "dbb", False), ("resnet18", "dbb", True),
                                             ("resnet18", "acb", False), ("mobilenet_v1", "dbb", False)])
def test_dbb_official_files_load_exactly(tmp_path, arch, rep, deploy):
    """DBB / ACB files in the official layout (ResNet-18 with either block, the depthwise DBBs of MobileNetV1;
    training and deploy forms; identity-based 1x1s holding a nonzero difference): the loaded model's eval output
    equals the official forward from the file's tensors (1e-5 relative, float32)."""
    state = random_state(official_dbb_shapes(rep, arch, deploy))
    torch.save(state, tmp_path / "official.pth")
    model = from_official(tmp_path / "official.pth", arch, rep, "dbb")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, reference = model(x), official_dbb_forward(state, arch, x)
    assert float((out - reference).norm() / reference.norm()) <= 1e-5


# -- RepOptimizers (DingXiaoH/RepOptimizers, RepOptVGG(mode)): stage0 and stage{s}.{j}; linear. Per block: the target
# (RealVGGBlock) conv.weight (no bias) + bn.*, fused: conv.weight + conv.bias; the Hyper-Search model (LinearAddBlock)
# conv.weight, conv_1x1.weight, scale_conv.weight / scale_1x1.weight (O,), scale_identity.weight (O,) where in == out
# and stride 1, bn.*; the baseline (its RepVGGBlock) conv_3x3 / bn_3x3, conv_1x1 / bn_1x1, bn_identity. The layout is
# the same at every size: RepVGG-A0's widths keep the test small.
def official_repopt_state(mode: str, deploy: bool = False) -> dict:
    shapes = {}
    for p, cin, cout, stride in repvgg_blocks():
        identity = cin == cout and stride == 1
        if mode == "target" or deploy:
            shapes |= {f"{p}.conv.weight": (cout, cin, 3, 3)} | (
                {f"{p}.conv.bias": (cout,)} if deploy else _bn_shapes(f"{p}.bn", cout))
        elif mode == "hs":
            shapes |= {f"{p}.conv.weight": (cout, cin, 3, 3), f"{p}.conv_1x1.weight": (cout, cin, 1, 1),
                       f"{p}.scale_conv.weight": (cout,), f"{p}.scale_1x1.weight": (cout,),
                       **({f"{p}.scale_identity.weight": (cout,)} if identity else {}), **_bn_shapes(f"{p}.bn", cout)}
        else:
            shapes |= {f"{p}.conv_3x3.weight": (cout, cin, 3, 3), **_bn_shapes(f"{p}.bn_3x3", cout),
                       f"{p}.conv_1x1.weight": (cout, cin, 1, 1), **_bn_shapes(f"{p}.bn_1x1", cout),
                       **(_bn_shapes(f"{p}.bn_identity", cout) if identity else {})}
    return random_state(shapes | {"linear.weight": (CLASSES, A0[-1][1]), "linear.bias": (CLASSES,)})


def official_repopt_forward(state, x):
    """Per block ReLU(BN(conv(x))), ReLU(BN(s_conv conv3x3(x) + s_1x1 conv1x1(x) + s_id x)) or ReLU(BN(conv3x3(x)) +
    BN(conv1x1(x)) + BN(x)), from the file's tensors."""
    def scaled(name, y):
        return y * state[f"{p}.{name}.weight"].view(1, -1, 1, 1)

    for p, _, _, stride in repvgg_blocks():
        if f"{p}.conv_3x3.weight" in state:
            y = _bn(state, f"{p}.bn_3x3", F.conv2d(x, state[f"{p}.conv_3x3.weight"], None, stride, 1)) + _bn(
                state, f"{p}.bn_1x1", F.conv2d(x, state[f"{p}.conv_1x1.weight"], None, stride, 0))
            x = F.relu(y + _bn(state, f"{p}.bn_identity", x) if f"{p}.bn_identity.weight" in state else y)
            continue
        y = F.conv2d(x, state[f"{p}.conv.weight"], state.get(f"{p}.conv.bias"), stride, 1)
        if f"{p}.scale_conv.weight" in state:
            y = scaled("scale_conv", y) + scaled("scale_1x1", F.conv2d(x, state[f"{p}.conv_1x1.weight"], None,
                                                                        stride, 0))
            y = y + scaled("scale_identity", x) if f"{p}.scale_identity.weight" in state else y
        x = F.relu(y if f"{p}.conv.bias" in state else _bn(state, f"{p}.bn", y))
    return F.linear(x.mean((2, 3)), state["linear.weight"], state["linear.bias"])


@pytest.mark.parametrize("mode,rep,deploy", [("target", "repopt", False), ("target", "repopt", True),
                                             ("hs", "hs", False), ("repvgg", "repvgg", False)],
                         ids=["target", "fused", "hyper-search", "repvgg-baseline"])
def test_repopt_official_files_load_exactly(tmp_path, mode, rep, deploy):
    """RepOptimizers files (a RepOpt-VGG target, fused or not; a Hyper-Search model with its trained scales; the
    repo's RepVGG baseline): the output equals the official forward from the file's tensors (1e-5 relative,
    float32); a target's own RepOptimizer constants stay its own, an HS file's scales are loaded."""
    state = official_repopt_state(mode, deploy)
    torch.save({"model": state}, tmp_path / "official.pth")
    model = from_official(tmp_path / "official.pth", "repvgg_a0", rep, "repopt")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, reference = model(x), official_repopt_forward(state, x)
    assert float((out - reference).norm() / reference.norm()) <= 1e-5
    if mode == "hs":
        torch.save({k: v for k, v in state.items() if "scale_1x1" not in k}, tmp_path / "no-scales.pth")
        with pytest.raises(OfficialError, match="not in the file"):  # an HS model's scales are its weights
            from_official(tmp_path / "no-scales.pth", "repvgg_a0", rep, "repopt")


# -- OREPA (JUGGHM/OREPA_CVPR2022) ----------------------------------------------------------------------------------
# A 3x3 site P of ``-t OREPA``: P.weight_orepa_origin (O, I/g, 3, 3), _avg_conv / _pfir_conv / _1x1 (O, I/g, 1, 1),
# _1x1_kxk_idconv1 (T, I/g, 1, 1) + buffer P.id_tensor (the identity it is a difference from; T = I, or 2I where
# g > 4), _1x1_kxk_conv2 (O, T/g, 3, 3), _gconv_dw (8I, 1, 3, 3), _gconv_pw (O, 8I/g, 1, 1), buffers _avg_avg (3, 3)
# and _prior (O, 3, 3), P.vector (6, O), P.bn. A 1x1 site (Rep-1x1): P.weight_or1x1_origin (O, I, 1, 1),
# _l2i_conv1 (T, I, 1, 1), _l2i_conv2 (O, T, 1, 1) with T = min(I, O), P.vector (2, O), P.bn. The stem: stage0.conv1.weight{0,1,2}.* (three 3x3 sites without BN: 3 -> C, C -> C, C -> C)
# and stage0.conv1.bn. A BasicBlock projection: ConvBN (conv.weight, bn). OREPA-VGG: rbr_dense.weight_rbr_* (no
# plain 1x1, vector (5 or 6, O): the sixth row unused), rbr_1x1 ConvBN, rbr_identity BN. Deploy: orepa_reparam /
# or1x1_reparam / or_large_reparam / rbr_reparam / a ConvBN's conv, weight and bias.
def _prior(o):
    """OREPA supplement Table 1's frequency prior as the official code fills it: channel i < O/2 along the height,
    cos(pi (h + 0.5)(i + 1) / 3), the rest along the width with i + 1 - O/2."""
    prior = torch.empty(o, 3, 3)
    for i in range(o):
        for h in range(3):
            for w in range(3):
                f, pos = (i + 1, h) if i < o / 2 else (i + 1 - o / 2, w)
                prior[i, h, w] = math.cos(math.pi * (pos + 0.5) * f / 3)
    return prior


def _orepa_site_shapes(p, i, o, k, g=1, deploy=False, kind="orepa"):
    """Key -> shape of one site (``kind``: orepa for the ResNets, rbr for OREPA-VGG's dense 3x3, convbn)."""
    if deploy:
        name = {"convbn": "conv", "rbr": "rbr_reparam"}.get(kind) or {1: "or1x1_reparam", 3: "orepa_reparam",
                                                                      7: "or_large_reparam"}[k]
        return {f"{p}.{name}.weight": (o, i // g, k, k), f"{p}.{name}.bias": (o,)}
    if kind == "convbn":
        return {f"{p}.conv.weight": (o, i // g, k, k)} | _bn_shapes(f"{p}.bn", o)
    if k == 1:
        t = i if o > i else o
        return {f"{p}.weight_or1x1_origin": (o, i, 1, 1), f"{p}.weight_or1x1_l2i_conv1": (t, i, 1, 1),
                f"{p}.weight_or1x1_l2i_conv2": (o, t, 1, 1), f"{p}.vector": (2, o)} | _bn_shapes(f"{p}.bn", o)
    if k == 7:  # the deep stem
        return {key: shape for n, (a, b) in enumerate(((i, o), (o, o), (o, o)))
                for key, shape in _orepa_site_shapes(f"{p}.weight{n}", a, b, 3).items()
                if ".bn." not in key} | _bn_shapes(f"{p}.bn", o)
    w, t = f"{p}.weight_{kind}_", i if g <= 4 else 2 * i
    shapes = {f"{w}origin": (o, i // g, 3, 3), f"{w}avg_conv": (o, i // g, 1, 1), f"{w}avg_avg": (3, 3),
              f"{w}pfir_conv": (o, i // g, 1, 1), f"{w}prior": (o, 3, 3), f"{w}1x1_kxk_idconv1": (t, i // g, 1, 1),
              f"{p}.id_tensor": (t, i // g, 1, 1), f"{w}1x1_kxk_conv2": (o, t // g, 3, 3),
              f"{w}gconv_dw": (8 * i, 1, 3, 3), f"{w}gconv_pw": (o, 8 * i // g, 1, 1), f"{p}.vector": (6, o)}
    if kind == "orepa":
        shapes[f"{w}1x1"] = (o, i // g, 1, 1)
    return shapes | _bn_shapes(f"{p}.bn", o)


OREPA_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2), 64, 1), "wrn18_2x": ("basic", (2, 2, 2, 2), 128, 1),
                 "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 64, 32)}


def official_orepa_shapes(arch, deploy=False):
    """An official OREPA ResNet / WideResNet / ResNeXt (``-t OREPA``) or OREPA-VGG A0 (``-t OREPA_VGG``) file."""
    if arch == "repvgg_a0":
        shapes = {}
        for p, cin, cout, stride in repvgg_blocks():
            shapes |= _orepa_site_shapes(f"{p}.rbr_dense", cin, cout, 3, deploy=deploy, kind="rbr")
            if deploy:
                shapes = {k.replace("rbr_dense.rbr_reparam", "rbr_reparam"): v for k, v in shapes.items()}
                continue
            if cin != cout or stride != 1:
                shapes[f"{p}.rbr_dense.vector"] = (5, cout)  # the sixth row only where the block has an identity
            shapes |= _orepa_site_shapes(f"{p}.rbr_1x1", cin, cout, 1, kind="convbn") | (
                _bn_shapes(f"{p}.rbr_identity", cin) if cin == cout and stride == 1 else {})
        return shapes | {"linear.weight": (CLASSES, A0[-1][1]), "linear.bias": (CLASSES,)}
    block, depths, width, g = OREPA_RESNETS[arch]
    shapes, cin = _orepa_site_shapes("stage0.conv1", 3, width, 7, deploy=deploy), width
    for s, depth in enumerate(depths, 1):
        planes = width * 2 ** (s - 1)
        for j in range(depth):
            p, stride = f"stage{s}.{j}", 2 if j == 0 and s > 1 else 1
            if block == "basic":
                out = planes
                sites = [("conv1", cin, planes, 3, 1), ("conv2", planes, planes, 3, 1)]
            else:
                mid, out = 2 * planes, 4 * planes  # ResNeXt-50 32x4d: D = 32 x int(planes x 4 / 64)
                sites = [("conv1", cin, mid, 1, 1), ("conv2", mid, mid, 3, g), ("conv3", mid, out, 1, 1)]
            if stride != 1 or cin != out:
                sites.append(("shortcut", cin, out, 1, 1))
            for name, a, b, k, groups in sites:
                kind = "convbn" if name == "shortcut" and block == "basic" else "orepa"
                shapes |= _orepa_site_shapes(f"{p}.{name}", a, b, k, groups, deploy, kind)
            cin = out
    return shapes | {"linear.weight": (CLASSES, cin), "linear.bias": (CLASSES,)}


def official_orepa_state(arch, deploy=False):
    """Random tensors in those shapes; the fixed buffers as the official code fills them."""
    state = random_state(official_orepa_shapes(arch, deploy))
    for key, value in state.items():
        if key.endswith("id_tensor"):
            identity = torch.zeros_like(value)
            identity[torch.arange(value.shape[0]), torch.arange(value.shape[0]) % value.shape[1]] = 1
            state[key] = identity
        elif key.endswith("_avg_avg"):
            state[key] = torch.full((3, 3), 1 / 9)
        elif key.endswith("_prior"):
            state[key] = _prior(value.shape[0])
    return state


def official_orepa_kernel(state, p, groups=1):
    """One site's kernel by the paper's formulas on the file's tensors (before its BN): sum over branches of
    vector[b] * W_b, W_avg = 1x1 (x) avg, W_prior = 1x1 (x) prior, W_1x1-kxk = (idconv1 + id) composed with conv2 per
    group, W_1x1 centred, W_dw-pw with the pointwise rows in the official order (row within group, then group)."""
    w = f"{p}.weight_orepa_" if f"{p}.weight_orepa_origin" in state else f"{p}.weight_rbr_"
    if f"{p}.weight_or1x1_origin" in state:  # Rep-1x1
        v = state[f"{p}.vector"]
        l2i = torch.einsum("ti,ot->oi", state[f"{p}.weight_or1x1_l2i_conv1"][..., 0, 0],
                           state[f"{p}.weight_or1x1_l2i_conv2"][..., 0, 0])
        return v[0].view(-1, 1, 1, 1) * state[f"{p}.weight_or1x1_origin"] + v[1].view(-1, 1, 1, 1) * l2i[..., None, None]
    v = state[f"{p}.vector"]
    origin = state[f"{w}origin"]
    o, ig = origin.shape[:2]
    avg = state[f"{w}avg_conv"] * state[f"{w}avg_avg"]
    prior = state[f"{w}pfir_conv"] * state[f"{w}prior"].unsqueeze(1)
    first = (state[f"{w}1x1_kxk_idconv1"] + state[f"{p}.id_tensor"])[..., 0, 0]          # (T, I/g)
    second = state[f"{w}1x1_kxk_conv2"]                                                   # (O, T/g, 3, 3)
    one_kxk = torch.einsum("gti,gothw->goihw", first.view(groups, -1, ig),
                           second.view(groups, o // groups, -1, 3, 3)).reshape(o, ig, 3, 3)
    dw, pw = state[f"{w}gconv_dw"], state[f"{w}gconv_pw"][..., 0, 0]                     # (8I, 1, 3, 3), (O, 8I/g)
    dws = torch.einsum("cithw,ocit->coihw", dw.view(groups, ig, 8, 3, 3),
                       pw.view(o // groups, groups, ig, 8)).reshape(o, ig, 3, 3)
    terms = [origin, avg, prior, one_kxk]
    if f"{w}1x1" in state:
        terms.append(F.pad(state[f"{w}1x1"], [1, 1, 1, 1]))
    terms.append(dws)
    return sum(v[b].view(-1, 1, 1, 1) * term for b, term in enumerate(terms))


def official_orepa_site(state, p, x, stride, groups=1):
    """One site's output: a deployed conv, a ConvBN, the stem (three kernels composed as the official code does:
    each next kernel correlated with the composition so far, no flip), or BN(conv(x, kernel))."""
    for name in ("orepa_reparam", "or1x1_reparam", "or_large_reparam", "rbr_reparam", "conv"):
        if f"{p}.{name}.bias" in state:
            w = state[f"{p}.{name}.weight"]
            return F.conv2d(x, w, state[f"{p}.{name}.bias"], stride, w.shape[-1] // 2, 1, groups)
    if f"{p}.conv.weight" in state:
        return _bn(state, f"{p}.bn", F.conv2d(x, state[f"{p}.conv.weight"], None, stride, 0, 1, groups))
    if f"{p}.weight0.vector" in state:
        kernel = official_orepa_kernel(state, f"{p}.weight0").transpose(0, 1)
        for n in (1, 2):
            kernel = F.conv2d(kernel, official_orepa_kernel(state, f"{p}.weight{n}"), padding=2)
        return _bn(state, f"{p}.bn", F.conv2d(x, kernel.transpose(0, 1), None, stride, 3))
    kernel = official_orepa_kernel(state, p, groups)
    return _bn(state, f"{p}.bn", F.conv2d(x, kernel, None, stride, kernel.shape[-1] // 2, 1, groups))


def official_orepa_forward(state, arch, x):
    if arch == "repvgg_a0":
        for p, cin, cout, stride in repvgg_blocks():
            if f"{p}.rbr_reparam.weight" in state:
                x = F.relu(official_orepa_site(state, p, x, stride))
                continue
            y = official_orepa_site(state, f"{p}.rbr_dense", x, stride) + official_orepa_site(
                state, f"{p}.rbr_1x1", x, stride)
            x = F.relu(y + _bn(state, f"{p}.rbr_identity", x) if f"{p}.rbr_identity.weight" in state else y)
        return F.linear(x.mean((2, 3)), state["linear.weight"], state["linear.bias"])
    block, depths, _, g = OREPA_RESNETS[arch]
    x = F.max_pool2d(F.relu(official_orepa_site(state, "stage0.conv1", x, 2)), 3, 2, 1)
    for s, depth in enumerate(depths, 1):
        for j in range(depth):
            p, stride = f"stage{s}.{j}", 2 if j == 0 and s > 1 else 1
            shortcut = official_orepa_site(state, f"{p}.shortcut", x, stride) if any(
                k.startswith(f"{p}.shortcut.") for k in state) else x
            if block == "basic":
                y = official_orepa_site(state, f"{p}.conv1", x, stride)
                y = official_orepa_site(state, f"{p}.conv2", F.relu(y), 1)
            else:
                y = F.relu(official_orepa_site(state, f"{p}.conv1", x, 1))
                y = F.relu(official_orepa_site(state, f"{p}.conv2", y, stride, g))
                y = official_orepa_site(state, f"{p}.conv3", y, 1)
            x = F.relu(y + shortcut)
    return F.linear(x.mean((2, 3)), state["linear.weight"], state["linear.bias"])


@pytest.mark.parametrize("arch,rep,deploy", [("resnet18", "orepa", False), ("resnext50_32x4d", "orepa", False),
                                             ("wrn18_2x", "orepa", True), ("repvgg_a0", "orepa_vgg", False),
                                             ("repvgg_a0", "orepa_vgg", True), ("resnet18", "dbb", False)])
def test_orepa_official_files_load_exactly(tmp_path, arch, rep, deploy):
    """OREPA files in the official layout (ResNet-18 and ResNeXt-50 trained, WideResNet-18 (2x) converted, OREPA-VGG
    A0 both, and the repo's DBB ResNet-18, which reads as the DBB repo's): the loaded model's eval output equals the
    official forward from the file's tensors (1e-5 relative, float32). It holds only through the two transforms:
    the stem's second and third kernels load rotated (the official composition correlates instead of composing) and
    ResNeXt's dw-pw rows load permuted; the file's fixed buffers (identity, avg, prior) are checked, not loaded."""
    state = random_state(official_dbb_shapes("dbb", arch)) if rep == "dbb" else official_orepa_state(arch, deploy)
    torch.save({"state_dict": state}, tmp_path / "official.pth")
    model = from_official(tmp_path / "official.pth", arch, rep, "orepa")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        reference = (official_dbb_forward if rep == "dbb" else official_orepa_forward)(state, arch, x)
    assert float((out - reference).norm() / reference.norm()) <= 1e-5
