"""The dense runner's pieces (runners/dense.py): COCO and Cityscapes generated tiny in their real formats, checked
before anything runs, and one finetuning run each through MMEngine's Runner with mmdet's CocoMetric and mmseg's
IoUMetric."""

import json
from pathlib import Path

import pytest

from runners.data import DatasetMissing
from runners.dense import (check_cityscapes, check_coco, dense_config, ensure_tiny_cityscapes, ensure_tiny_coco,
                           train_and_evaluate)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_tiny_datasets_are_in_the_real_formats_and_checked(tmp_path):
    """The generated sets load with pycocotools / list as Cityscapes frames; a missing or malformed set is a
    DatasetMissing with one line naming what is wrong."""
    from pycocotools.coco import COCO
    for check in (check_coco, check_cityscapes):
        with pytest.raises(DatasetMissing, match="not found"):
            check(tmp_path)
    ensure_tiny_coco(tmp_path)
    ensure_tiny_cityscapes(tmp_path)
    check_coco(tmp_path)
    check_cityscapes(tmp_path)
    coco = COCO(str(tmp_path / "coco" / "annotations" / "instances_val2017.json"))
    assert len(coco.getImgIds()) == 4 and coco.getAnnIds() and {c["name"] for c in coco.loadCats(coco.getCatIds())} \
        <= {"person", "car", "dog"}
    mask = coco.annToMask(coco.loadAnns(coco.getAnnIds())[0])
    assert mask.sum() > 0
    ann = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetMissing) as e:
        check_coco(tmp_path)
    assert "lack annotations, categories" in str(e.value) and "\n" not in str(e.value)
    label = next((tmp_path / "cityscapes" / "gtFine" / "val").glob("*/*_labelTrainIds.png"))
    label.unlink()
    with pytest.raises(DatasetMissing, match="label .* is missing"):
        check_cityscapes(tmp_path)


@pytest.mark.parametrize("config, metric, scale", [
    (f"{CONFIGS}/mmdet/faster-rcnn_repbench-dbb-r50_fpn_1x_coco.py", "bbox_mAP", (128, 96)),
    (f"{CONFIGS}/mmseg/pspnet_repbench-orepa-r50-d8_4xb2-40k_cityscapes-512x1024.py", "mIoU", (64, 32))])
def test_one_finetuning_run_trains_and_evaluates_with_the_real_metric(config, metric, scale, tmp_path):
    """Two iterations of the stock detector / segmentor with a repbench backbone on the tiny set, then the config's
    own evaluator over the val split: the metric is a number in its range, the data loaded as the real datasets."""
    ensure_tiny_coco(tmp_path) if "mmdet" in config else ensure_tiny_cityscapes(tmp_path)
    cfg = dense_config(config, tmp_path, tmp_path / "work", iters=2, batch=2, scale=scale, constant_lr=True)
    assert cfg.model.backbone.norm_eval is False  # no pretrained weights: BN trains
    runner, metrics = train_and_evaluate(cfg)
    assert runner.iter == 2 and set(metrics) == {metric}
    assert 0.0 <= metrics[metric] <= (1.0 if metric == "bbox_mAP" else 100.0)
    assert len(runner.val_dataloader.dataset) == (4 if metric == "bbox_mAP" else 2)
    assert not list((tmp_path / "work").rglob("*.pth"))  # nothing checkpointed at this scale
