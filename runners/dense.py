"""Detection and segmentation on repbench backbones: the data (COCO, Cityscapes: checked, or generated tiny in exactly
their formats) and one finetuning run through MMEngine's Runner with the real metrics (mmdet's CocoMetric, mmseg's
IoUMetric).

A run's config inherits a stock config shipped in the mmdet / mmseg wheels (``configs/``: the repbench examples),
swaps in the row's backbone and points the datasets at the data root. What a scale changes is set here, in one place
(:func:`dense_config`): the number of iterations, the batch, the image size of the pipelines and no learning-rate
schedule at smoke; SyncBN becomes BN everywhere (the OREPA settings: no SyncBN; a single process has no group).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DatasetMissing, _publish

# COCO's own ids and names for the categories the tiny set draws (CocoDataset maps names to ids through the json)
TINY_COCO_CATEGORIES = ((1, "person"), (3, "car"), (18, "dog"))
CITYSCAPES_CLASSES = 19  # train ids 0..18, 255 ignored
TASKS = {"mmdet": "coco", "mmseg": "cityscapes"}


def check_coco(root: Path) -> None:
    """Raise :class:`DatasetMissing` (one line) unless ``root/coco`` holds annotations/instances_{train,val}2017.json
    (COCO json with images, annotations and categories) and the image folders they name."""
    coco = root / "coco"
    for split in ("train", "val"):
        ann = coco / "annotations" / f"instances_{split}2017.json"
        if not ann.is_file():
            raise DatasetMissing(f"COCO not found: {ann} is missing (point --data-root at a directory holding coco/ "
                                 "with annotations/instances_{train,val}2017.json and {train,val}2017/; nothing is "
                                 "downloaded)")
        try:
            data = json.loads(ann.read_text())
            missing = {"images", "annotations", "categories"} - set(data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise DatasetMissing(f"COCO annotations {ann} are not COCO json: {e}") from None
        if missing:
            raise DatasetMissing(f"COCO annotations {ann} lack {', '.join(sorted(missing))}")
        if not data["images"]:
            raise DatasetMissing(f"COCO annotations {ann} list no images")
        first = coco / f"{split}2017" / data["images"][0]["file_name"]
        if not first.is_file():
            raise DatasetMissing(f"COCO image {first} (named in {ann.name}) is missing")


def check_cityscapes(root: Path) -> None:
    """Raise :class:`DatasetMissing` (one line) unless ``root/cityscapes`` has leftImg8bit/{train,val}/<city>/
    *_leftImg8bit.png with their gtFine/.../*_gtFine_labelTrainIds.png (cityscapesscripts' createTrainIdLabelImgs)."""
    city = root / "cityscapes"
    for split in ("train", "val"):
        images = sorted((city / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        if not images:
            raise DatasetMissing(f"Cityscapes not found: no {city}/leftImg8bit/{split}/<city>/*_leftImg8bit.png (point "
                                 "--data-root at a directory holding cityscapes/ with leftImg8bit/ and gtFine/; "
                                 "nothing is downloaded)")
        label = (city / "gtFine" / split / images[0].parent.name /
                 images[0].name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"))
        if not label.is_file():
            raise DatasetMissing(f"Cityscapes label {label} is missing (the train-id maps come from cityscapesscripts' "
                                 "createTrainIdLabelImgs)")


def _generated_once(path: Path, write) -> Path:
    """``path``, written by ``write(tmp)`` into a temporary folder renamed into place unless it exists (workers that
    generate it at once: the first rename wins)."""
    if not path.is_dir():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write(tmp)
        _publish(tmp, path)
    return path


def ensure_tiny_coco(root: Path, images: int = 4, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """``root/coco`` in COCO's layout, generated once: per split ``images`` JPEGs (HxW ``size``) of noise with one
    to three filled rectangles, each an annotation with its box, polygon mask, area and a COCO category."""
    return _generated_once(root / "coco", lambda tmp: _write_tiny_coco(tmp, images, size, seed))


def _write_tiny_coco(tmp: Path, images: int, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = size
    categories = [{"id": i, "name": name, "supercategory": name} for i, name in TINY_COCO_CATEGORIES]
    for split in ("train", "val"):
        (tmp / f"{split}2017").mkdir(parents=True)
        entries, annotations = [], []
        for index in range(images):
            image_id = index + 1 + (0 if split == "train" else 1000)
            pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                category = int(rng.integers(len(TINY_COCO_CATEGORIES)))
                pixels[y:y + bh, x:x + bw] = 90 + 50 * category + rng.integers(0, 20, 3)
                annotations.append({"id": len(annotations) + 1 + image_id * 10, "image_id": image_id,
                                    "category_id": TINY_COCO_CATEGORIES[category][0], "bbox": [x, y, bw, bh],
                                    "area": float(bw * bh), "iscrowd": 0,
                                    "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
            name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels).save(tmp / f"{split}2017" / name, quality=95)
            entries.append({"id": image_id, "file_name": name, "height": h, "width": w})
        (tmp / "annotations").mkdir(exist_ok=True)
        (tmp / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": entries, "annotations": annotations, "categories": categories}))


def ensure_tiny_cityscapes(root: Path, frames: int = 2, size: tuple[int, int] = (64, 128), seed: int = 0) -> Path:
    """``root/cityscapes`` in Cityscapes' layout, generated once: per split ``frames`` frames of one city, each an
    RGB image and its train-id label map (horizontal bands of classes, some pixels 255 = ignored)."""
    return _generated_once(root / "cityscapes", lambda tmp: _write_tiny_cityscapes(tmp, frames, size, seed))


def _write_tiny_cityscapes(tmp: Path, frames: int, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = size
    for split in ("train", "val"):
        city = "aachen" if split == "train" else "frankfurt"
        images, labels = tmp / "leftImg8bit" / split / city, tmp / "gtFine" / split / city
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for index in range(frames):
            label = np.repeat(rng.integers(0, CITYSCAPES_CLASSES, (h // 8, 1)), 8, axis=0) * np.ones((1, w), int)
            label[rng.random((h, w)) < 0.02] = 255
            pixels = (label[..., None] * 12 % 256 + rng.integers(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)
            stem = f"{city}_{index:06d}_000019"
            Image.fromarray(pixels).save(images / f"{stem}_leftImg8bit.png")
            Image.fromarray(label.astype(np.uint8)).save(labels / f"{stem}_gtFine_labelTrainIds.png")


def _replace_types(node, old: str, new: str):
    """Every ``type=old`` in a config tree becomes ``new`` (SyncBN -> BN)."""
    if isinstance(node, dict):
        if node.get("type") == old:
            node["type"] = new
        for value in node.values():
            _replace_types(value, old, new)
    elif isinstance(node, list):
        for value in node:
            _replace_types(value, old, new)


def _resize_pipeline(pipeline: list, scale: tuple[int, int]) -> list:
    """The stock pipelines at another image size (w, h): Resize / RandomResize to ``scale``, RandomCrop to it."""
    out = []
    for step in pipeline:
        step = copy.deepcopy(step)
        if step["type"] in ("Resize", "RandomResize"):
            step["scale"] = scale
            if step["type"] == "RandomResize":
                step["ratio_range"] = (1.0, 1.0)
        elif step["type"] == "RandomCrop":
            step["crop_size"] = (scale[1], scale[0])
        out.append(step)
    return out


def dense_config(config: str | Path, data_root: Path, work_dir: Path, *, backbone: dict | None = None,
                 iters: int | None = None, batch: int | None = None, scale: tuple[int, int] | None = None,
                 constant_lr: bool = False, seed: int = 0):
    """The MMEngine config of one run: ``config`` (a repbench example config inheriting a stock one) with the row's
    ``backbone`` fields, the datasets under ``data_root`` (coco/ or cityscapes/), ``work_dir`` for its logs; where
    given, ``iters`` (an iteration-based loop validating at its end), ``batch`` per device, the pipelines' image
    size ``scale`` (w, h) and ``constant_lr`` (no warm-up or decay: smoke). SyncBN -> BN."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    scope = cfg.default_scope
    if scope not in TASKS:
        raise ValueError(f"{config}: default_scope {scope!r} is neither mmdet nor mmseg")
    if backbone:
        cfg.model.backbone.update(backbone)
    if not cfg.model.backbone.get("pretrained"):
        # no pretrained weights: BN statistics of a fresh backbone are 0 / 1, which eval-mode BN (the stock
        # norm_eval=True) does not normalise by; a recorded choice, as the run's "no pretrained"
        cfg.model.backbone.norm_eval = False
    _replace_types(cfg._cfg_dict, "SyncBN", "BN")
    dataset_root = str(data_root / TASKS[scope]) + "/"
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg[name]
        dataset = loader.dataset.get("dataset", loader.dataset)  # RepeatDataset wraps some
        dataset.data_root = dataset_root
        if scale is not None:
            dataset.pipeline = _resize_pipeline(dataset.pipeline, scale)
        loader.num_workers, loader.persistent_workers = 0, False
        if batch is not None and name == "train_dataloader":
            loader.batch_size = batch
    preprocessor = cfg.model.get("data_preprocessor") or {}
    if scale is not None and preprocessor.get("size"):  # mmseg pads every batch to the crop size
        preprocessor["size"] = (scale[1], scale[0])
    for name in ("val_evaluator", "test_evaluator"):
        if "ann_file" in cfg[name]:
            cfg[name].ann_file = str(data_root / "coco" / "annotations" / Path(cfg[name].ann_file).name)
    if iters is not None:
        # validated once, after training (train_and_evaluate), not by the loop
        cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters, val_begin=iters + 1)
        cfg.train_dataloader.sampler = dict(type="InfiniteSampler", shuffle=True)
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=-1, by_epoch=False, save_last=False)
        cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    if constant_lr:
        cfg.param_scheduler = []
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=seed)
    cfg.launcher = "none"
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                       dist_cfg=dict(backend="gloo"))
    cfg.visualizer = dict(type=cfg.visualizer.type, vis_backends=[dict(type="LocalVisBackend")],
                          name="visualizer")
    return cfg


METRIC_KEYS = {"mmdet": ("coco/bbox_mAP", "bbox_mAP"), "mmseg": ("mIoU", "mIoU")}  # Runner key -> stored name


def train_and_evaluate(cfg) -> tuple[object, dict[str, float]]:
    """Train ``cfg`` with MMEngine's Runner and evaluate on its val set with the config's metric; returns the runner
    (its model trained) and the metrics (``bbox_mAP`` in [0, 1] from CocoMetric, ``mIoU`` in % from IoUMetric)."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    scope = cfg.default_scope
    init_default_scope(scope)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    key, name = METRIC_KEYS[scope]
    if key not in metrics and scope == "mmdet":  # CocoMetric returns nothing when no box passed the score threshold
        return runner, {name: 0.0}                # (an undertrained smoke model): no true positive, AP 0
    return runner, {name: float(metrics[key])}
