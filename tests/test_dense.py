"""repbench backbones inside real MMDetection / MMSegmentation models built from the stock configs: one CPU training
step each, and identical backbone features and pre-NMS head outputs before and after deploy."""

import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope

from backbones import CheckpointError, build_classifier, deploy, save_checkpoint
from conftest import randomize, rel_err

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DET = ["faster-rcnn_repbench-{rep}-r50_fpn_1x_coco.py", "retinanet_repbench-{rep}-r50_fpn_1x_coco.py"]
SEG = ["pspnet_repbench-{rep}-r50-d8_4xb2-40k_cityscapes-512x1024.py",
       "deeplabv3plus_repbench-{rep}-r50-d8_4xb2-40k_cityscapes-512x1024.py"]
CASES = [("mmdet", c, rep) for c in DET for rep in ("orepa", "dbb")] + \
        [("mmseg", c, rep) for c in SEG for rep in ("orepa", "dbb")]


def build(scope, name, rep, **backbone):
    cfg = Config.fromfile(str(CONFIGS / scope / name.format(rep=rep)))
    cfg.model.backbone.update(backbone)
    if scope == "mmseg":  # the stock preprocessor pads every batch to the 512x1024 crop: keep the test's 64x64
        cfg.model.data_preprocessor.size = (64, 64)
    init_default_scope(scope)
    if scope == "mmdet":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return revert_sync_batchnorm(MODELS.build(cfg.model))


def det_batch(model, size=128):
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    torch.manual_seed(0)
    samples = []
    for _ in range(2):
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                                             scale_factor=(1.0, 1.0), batch_input_shape=(size, size)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 12.0, 70.0, 90.0], [40.0, 30.0, 120.0, 100.0]]),
                                           labels=torch.tensor([1, 3]))
        samples.append(sample)
    return torch.rand(2, 3, size, size) * 255, samples


def seg_batch(model, size=64):
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData
    torch.manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, size, size)))
        samples.append(sample)
    return torch.rand(2, 3, size, size) * 255, samples


def calibrate_bn(backbone, inputs):
    """BN statistics measured on the batch (with random gamma/beta): the detectors' deep heads overflow float32 on
    uncalibrated statistics, which would compare infinities, not the deploy conversion."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        backbone(inputs)
    for m in norms:
        m.eval()


def head_outputs(scope, model, data):
    """Raw head outputs before any NMS: RPN / RetinaNet scores and box deltas on every level, the RoI head on fixed
    RoIs (the ground-truth boxes); for segmentors the logits."""
    if scope == "mmseg":
        return flatten(model(**data, mode="tensor"))
    feats = model.extract_feat(data["inputs"])
    if hasattr(model, "rpn_head"):
        from mmdet.structures.bbox import bbox2roi
        rois = bbox2roi([s.gt_instances.bboxes for s in data["data_samples"]])
        return flatten(model.rpn_head(feats)) + flatten(model.roi_head._bbox_forward(feats, rois))
    return flatten(model.bbox_head(feats))


def flatten(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)):
        return [t for o in outputs for t in flatten(o)]
    if isinstance(outputs, dict):
        return [t for k in sorted(outputs) for t in flatten(outputs[k])]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("scope,name,rep", CASES, ids=[f"{n.split('_')[0]}-{r}" for _, n, r in CASES])
def test_train_step_and_deploy_equivalence(scope, name, rep):
    model = build(scope, name, rep)
    inputs, samples = (det_batch if scope == "mmdet" else seg_batch)(model)
    data = model.data_preprocessor({"inputs": list(inputs), "data_samples": samples}, training=True)
    model.train()
    losses = model(**data, mode="loss")
    loss = sum(v.sum() for k, v in losses.items() if "loss" in k and isinstance(v, torch.Tensor)) + \
        sum(sum(x.sum() for x in v) for k, v in losses.items() if "loss" in k and isinstance(v, list))
    assert torch.isfinite(loss)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    optimizer.step()

    model.eval()
    randomize(model.backbone)
    data = model.data_preprocessor({"inputs": list(inputs), "data_samples": samples}, training=False)
    calibrate_bn(model.backbone, data["inputs"])
    # Compared in float64, so that the deploy conversion is what is measured, not float32 rounding amplified by
    # 50 layers, an FPN and the heads.
    model = model.double()
    data["inputs"] = data["inputs"].double()
    for sample in data["data_samples"]:
        if "gt_instances" in sample:
            sample.gt_instances.bboxes = sample.gt_instances.bboxes.double()
    with torch.no_grad():
        features = model.backbone(data["inputs"])
        head = head_outputs(scope, model, data)
        model.backbone.switch_to_deploy()
        assert not any(type(m).__name__ in ("OREPA", "DBB") for m in model.backbone.modules())
        features_deployed = model.backbone(data["inputs"])
        head_deployed = head_outputs(scope, model, data)
    assert len(features) == 4 and len(head) == len(head_deployed) > 0
    for a, b in zip(features_deployed, features):
        assert rel_err(a, b) <= 1e-10
    assert [t.shape for t in head_deployed] == [t.shape for t in head]
    for a, b in zip(head_deployed, head):
        assert rel_err(a, b) <= 1e-9


def test_pretrained_is_loaded_strictly_in_both_forms(tmp_path):
    from backbones.mm import ResNet
    classifier = randomize(build_classifier("resnet50", "orepa", num_classes=1000))
    save_checkpoint(classifier, tmp_path / "train.pth")
    save_checkpoint(deploy(copy.deepcopy(classifier)), tmp_path / "deploy.pth")
    x = torch.randn(1, 3, 64, 64)
    classifier.eval()
    with torch.no_grad():
        expected = classifier.forward_features(x)
    for form in ("train", "deploy"):
        backbone = ResNet(depth=50, rep="orepa", pretrained=str(tmp_path / f"{form}.pth")).eval()
        with torch.no_grad():
            got = backbone(x)
        for a, b in zip(got, expected):
            assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("other", [dict(depth=34, rep="orepa"), dict(depth=50, rep="dbb")])
def test_mismatched_pretrained_fails_loudly(tmp_path, other):
    save_checkpoint(build_classifier("resnet50", "orepa"), tmp_path / "r50.pth")
    with pytest.raises(CheckpointError):
        build("mmdet", DET[0], other["rep"], depth=other["depth"], pretrained=str(tmp_path / "r50.pth"))


def test_pretrained_url_is_refused():
    from backbones.mm import ResNet
    with pytest.raises(CheckpointError, match="not a local file"):
        ResNet(depth=18, pretrained="torchvision://resnet18")


def _stem_and_stage_state(scope, name, rep, freeze):
    """(requires_grad of the stem, of layer1, of layer2) and the lr of the stem's and layer2's parameters in the
    optimizer the config's optim_wrapper builds (mmengine's builder, the config's constructor)."""
    from mmengine.optim import build_optim_wrapper
    cfg = Config.fromfile(str(CONFIGS / scope / name.format(rep="dbb" if rep == "none" else rep)))
    cfg.model.backbone.update(rep=rep, freeze=freeze)
    init_default_scope(scope)
    if scope == "mmdet":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model = MODELS.build(cfg.model)
    net = model.backbone.net
    grads = tuple(all(p.requires_grad for p in m.parameters()) for m in (net.stem, net.layer1, net.layer2))
    lr = {id(p): group["lr"] for group in build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
          for p in group["params"]}
    return grads, lr[id(next(net.stem.parameters()))], lr[id(next(net.layer2.parameters()))]


@pytest.mark.parametrize("scope, name", [("mmdet", DET[0]), ("mmseg", SEG[0])])
def test_freezing_switches_paper_and_fair(scope, name):
    """Issue 14's freezing reading, on each task's example config: ``paper`` keeps the stock freezing (mmdet: stem
    and layer1 frozen; mmseg: nothing) for None and DBB and leaves OREPA's linear deep stem trainable at lr x0.1;
    ``fair`` freezes the same stages for every rep, every stem trainable at lr x0.1."""
    stock_layer1 = scope == "mmseg"  # mmdet's stock configs freeze layer1, mmseg's do not
    for freeze in ("paper", "fair"):
        seen = {rep: _stem_and_stage_state(scope, name, rep, freeze) for rep in ("none", "dbb", "orepa")}
        for rep, ((stem, layer1, layer2), stem_lr, layer2_lr) in seen.items():
            trainable_stem = freeze == "fair" or rep == "orepa" or scope == "mmseg"
            assert (stem, layer1, layer2) == (trainable_stem, stock_layer1, True), (freeze, rep)
            reduced = freeze == "fair" or rep == "orepa"
            assert stem_lr == pytest.approx(layer2_lr * (0.1 if reduced else 1.0)), (freeze, rep)
        if freeze == "fair":
            assert len({state for state, _, _ in seen.values()}) == 1
    with pytest.raises(ValueError, match="unknown freeze"):
        _stem_and_stage_state(scope, name, "dbb", "loose")


def test_frozen_stages_as_indices():
    """``frozen_stages`` as mmdet's int (the stem and the first k stages) or as the indices themselves."""
    from backbones.mm import frozen_indices
    assert frozen_indices(1, "paper", False) == (0, 1) and frozen_indices(1, "paper", True) == (1,)
    assert frozen_indices(2, "fair", False) == (1, 2) and frozen_indices(-1, "fair", True) == ()
    assert frozen_indices((1, 0), "fair", True) == (0, 1)  # given explicitly: taken as it is
    for bad in (5, (0, 7)):
        with pytest.raises(ValueError, match="frozen_stages"):
            frozen_indices(bad, "paper", False)
