"""Detection and segmentation on repbench backbones: the data (COCO, Cityscapes: checked, or generated tiny in exactly
their formats) and one finetuning run through MMEngine's Runner with the real metrics (mmdet's CocoMetric, mmseg's
IoUMetric).

A run's config inherits a stock config shipped in the mmdet / mmseg wheels (``configs/``: the repbench examples),
swaps in the row's backbone and points the datasets at the data root. What a scale changes is set here, in one place
(:func:`dense_config`): the number of iterations, the batch, the image size of the pipelines and no learning-rate
schedule at smoke; SyncBN becomes BN everywhere (the OREPA settings: no SyncBN; a single process has no group).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DatasetMissing, _publish

# COCO's own ids and names for the categories the tiny set draws (CocoDataset maps names to ids through the json)
TINY_COCO_CATEGORIES = ((1, "person"), (3, "car"), (18, "dog"))
# COCO's 80 category ids (1..90 with ten unused), in the order of its class names
COCO_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
CITYSCAPES_CLASSES = 19  # train ids 0..18, 255 ignored
TASKS = {"mmdet": "coco", "mmseg": "cityscapes"}
CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the repbench example configs (a row's Row.config)


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


def _coco_names() -> tuple[str, ...]:
    from mmdet.datasets import CocoDataset
    return tuple(CocoDataset.METAINFO["classes"])


def _write_tiny_coco(tmp: Path, images: int, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = size
    # every COCO category is listed (CocoMetric maps a detector's 80 labels through them), a few are drawn
    categories = [{"id": i, "name": name, "supercategory": name} for i, name in zip(COCO_IDS, _coco_names())]
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


def config_path(config: str | Path) -> Path:
    """A row's config: a path, or a name under configs/ (``mmdet/faster-rcnn_repbench-orepa-r50_fpn_1x_coco.py``)."""
    path = Path(config)
    return path if path.is_absolute() or path.is_file() else CONFIGS / path


@functools.cache
def _loaded(config: str):
    from mmengine.config import Config
    return Config.fromfile(str(config_path(config)))


def task_of(config: str) -> str:
    """``mmdet`` or ``mmseg``: the config's default scope."""
    scope = _loaded(str(config)).default_scope
    if scope not in TASKS:
        raise ValueError(f"{config}: default_scope {scope!r} is neither mmdet nor mmseg")
    return scope


def stock_batch(config: str, options: dict | None = None) -> tuple[int, int, float]:
    """(images per device, global batch, lr) of the stock config as its authors ran it (``options``: a paper's
    departures from it, e.g. 4 images per GPU): mmdet's global batch is its ``auto_scale_lr.base_batch_size`` (1x:
    16 = 8 GPUs x 2), mmseg's the ``<devices>xb<batch>`` of its name; a per-device batch the options change keeps
    that global batch on fewer devices."""
    cfg = _loaded(str(config))
    if options:
        cfg = copy.deepcopy(cfg)
        cfg.merge_from_dict(options)
    batch, lr = cfg.train_dataloader.batch_size, cfg.optim_wrapper.optimizer.lr
    if cfg.default_scope == "mmdet":
        return batch, int(cfg.auto_scale_lr.base_batch_size), lr
    match = re.search(r"(\d+)xb(\d+)", Path(config).name)
    if not match:
        raise ValueError(f"{config}: an mmseg config's name says its devices and batch (4xb2)")
    return batch, int(match[1]) * int(match[2]), lr


def batch_plan(recipe, config: str, devices: int, options: dict | None = None) -> dict:
    """How ``devices`` processes run a dense row (the values every run records, as the classification runs'
    jobs.batch_plan): the stock global batch and lr kept by accumulation when the recipe keeps the config's batch;
    a recipe's own smaller batch trains at ``batch x devices`` with the lr scaled linearly (mmdet's auto_scale_lr
    rule). ValueError naming the valid device counts when ``devices`` cannot keep the stock batch."""
    from .launch import accumulation
    batch, paper_global, lr = stock_batch(config, options)
    common = {"world_size": devices, "paper_devices": paper_global // batch, "paper_global_batch": paper_global}
    if recipe.batch is None:
        accum = accumulation(paper_global, batch, devices)
        return {**common, "grad_accum": accum, "per_device_batch": batch, "global_batch": paper_global, "lr": lr}
    return {**common, "grad_accum": 1, "per_device_batch": recipe.batch, "global_batch": recipe.batch * devices,
            "lr": lr * recipe.batch * devices / paper_global}


def dense_config(config: str | Path, data_root: Path, work_dir: Path, *, backbone: dict | None = None,
                 iters: int | None = None, batch: int | None = None, scale: tuple[int, int] | None = None,
                 constant_lr: bool = False, seed: int = 0, lr: float | None = None, grad_accum: int = 1,
                 distributed: bool = False, options: dict | None = None, quiet: bool = False):
    """The MMEngine config of one run: ``config`` (a repbench example config inheriting a stock one) with the row's
    ``backbone`` fields, the datasets under ``data_root`` (coco/ or cityscapes/), ``work_dir`` for its logs; where
    given, ``iters`` (an iteration-based loop validating at its end), ``batch`` per device, the pipelines' image
    size ``scale`` (w, h), ``constant_lr`` (no warm-up or decay: smoke), the optimizer's ``lr``, ``grad_accum``
    micro-batches per step (MMEngine's accumulative_counts) and ``distributed`` (MMEngine wraps the model in DDP on
    the process group the caller set up); ``options``: a user's overrides (``--cfg-options``), merged first;
    ``quiet``: MMEngine logs errors only (a short run: no per-parameter init dump, no per-step lines). SyncBN ->
    BN."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_path(config)))
    if options:
        cfg.merge_from_dict(options)
    scope = cfg.default_scope
    if scope not in TASKS:
        raise ValueError(f"{config}: default_scope {scope!r} is neither mmdet nor mmseg")
    if backbone:
        if backbone.get("type", cfg.model.backbone.type) != cfg.model.backbone.type:  # ResNet <-> RepVGG: the
            # stage-level settings carry over, the architecture's own (depth, strides, dilations) do not
            kept = ("out_indices", "frozen_stages", "norm_eval", "freeze", "pretrained", "init_cfg")
            cfg.model.backbone = {k: v for k, v in cfg.model.backbone.items() if k in kept}
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
    if lr is not None:
        cfg.optim_wrapper.optimizer.lr = lr
    if grad_accum > 1:
        cfg.optim_wrapper.accumulative_counts = grad_accum
    cfg.work_dir = str(work_dir)
    cfg.log_level = "ERROR" if quiet else "INFO"
    cfg.randomness = dict(seed=seed)
    # MMEngine's launchers call torch.cuda.set_device: the process group is the worker's own (runners/launch.py);
    # "pytorch" here only tells the Runner to wrap the model in DDP on it
    cfg.launcher = "pytorch" if distributed else "none"
    if distributed:
        import torch
        if not torch.cuda.is_available():  # a CPU module takes no device_ids (MMEngine passes LOCAL_RANK's)
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                         find_unused_parameters=cfg.get("find_unused_parameters", False))
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                       dist_cfg=dict(backend="gloo"))
    cfg.visualizer = dict(type=cfg.visualizer.type, vis_backends=[dict(type="LocalVisBackend")],
                          name="visualizer")
    return cfg


METRIC_KEYS = {"mmdet": ("coco/bbox_mAP", "bbox_mAP"), "mmseg": ("mIoU", "mIoU")}  # Runner key -> stored name


def train_and_evaluate(cfg, hooks=()) -> tuple[object, dict[str, float]]:
    """Train ``cfg`` with MMEngine's Runner (and ``hooks``, objects registered beside the config's) and evaluate on
    its val set with the config's metric; returns the runner (its model trained) and the metrics (``bbox_mAP`` in
    [0, 1] from CocoMetric, ``mIoU`` in % from IoUMetric)."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    scope = cfg.default_scope
    init_default_scope(scope)
    # pycocotools prints as it loads and evaluates; a quiet run (log_level ERROR) keeps that out of the job's log
    hush = contextlib.redirect_stdout(io.StringIO()) if cfg.get("log_level") == "ERROR" else contextlib.nullcontext()
    with hush:
        runner = Runner.from_cfg(cfg)
        for hook in hooks:
            runner.register_hook(hook)
        runner.train()
        metrics = runner.val_loop.run()
    key, name = METRIC_KEYS[scope]
    if key not in metrics and scope == "mmdet":  # CocoMetric returns nothing when no box passed the score threshold
        return runner, {name: 0.0}                # (an undertrained smoke model): no true positive, AP 0
    return runner, {name: float(metrics[key])}


# -- one row of a dense table: its job (planned by runners/jobs.py, run by jobs.execute) ------------------------------

def ensure_data(task: str, recipe, data_root: Path) -> None:
    """The row's dataset under ``data_root``: generated tiny (``recipe.data == "tiny"``) or checked."""
    if recipe.data == "tiny":
        (ensure_tiny_coco if task == "mmdet" else ensure_tiny_cityscapes)(data_root, recipe.tiny_images)
    else:
        (check_coco if task == "mmdet" else check_cityscapes)(data_root)


def find_pretrained(store, arch: str, rep: str, variant: dict, scale: str, paper: str) -> dict | None:
    """The classification run a dense row's backbone starts from: a finished run of the same arch, rep and variant
    at ``scale`` with its final train-form weights recorded, of the row's own paper first, then the newest. Returns
    ``{"path", "sha256", "run_key", "table", "row", "scale", "top1"}`` or None."""
    runs = store.runs_matching({"arch": arch, "rep": rep, "variant": variant, "scale": scale})
    runs = sorted(runs.itertuples(), key=lambda r: not r.table_name.startswith(paper + "."))
    for run in runs:
        files = store.artifacts_frame(run.id)
        files = files[files.kind == "weights_train"]
        if not files.empty:
            return {"path": files.path.iloc[-1], "sha256": files.sha256.iloc[-1], **_origin(store, run)}
    return None


def origin_of_file(store, sha256: str) -> dict:
    """Where a user's checkpoint came from, when this suite wrote it: the finished run that recorded final weights
    with this sha256 (``{"run_key", "table", "row", "scale", "top1"}``), else {}."""
    files = store.artifacts_frame()
    files = files[files.kind.isin(("weights_train", "weights_deploy")) & (files.sha256 == sha256)]
    runs = store.runs_frame()
    for run_id in files.run_id:
        run = runs[(runs.id == run_id) & (runs.status == "finished")]
        if len(run):
            return _origin(store, next(run.itertuples()))
    return {}


def _origin(store, run) -> dict:
    metrics = store.metrics_frame(run.table_name)
    top1 = metrics[(metrics.run_id == run.id) & (metrics.name == "top1")].value
    return {"run_key": run.run_key, "table": run.table_name, "row": run.row_name, "scale": run.scale,
            "top1": float(top1.iloc[-1]) if len(top1) else None}


def dense_train_step(cfg_dict: dict, device: str):
    """The training step the cost probes measure for a dense row: its detector / segmentor and optimizer built from
    the run's config, one fixed batch of the train loader (through the model's data preprocessor each step, as in
    training), and MMEngine's ``train_step`` (forward, losses, backward, optimizer step). Module-level and fed a plain
    dict: the memory probe runs it in a fresh child."""
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner

    import backbones.mm  # noqa: F401 - the repbench scope's registries

    cfg = Config(cfg_dict)
    init_default_scope(cfg.default_scope)
    # the current MMEngine logger at the run's level: model.init_weights reports every parameter at INFO
    MMLogger.get_instance(f"repbench-probe-{os.getpid()}", log_level=cfg.get("log_level", "INFO"))
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.to(device).train()
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=cfg.randomness.get("seed", 0))
    data = next(iter(loader))

    def step():
        return model.train_step(data, wrapper)

    return step


def _measure_costs(store, claim, job, recipe, cfgs: dict, device: str, log) -> None:
    """Training memory (a step in a fresh capped child, as every table's) and time per step, the row's and its
    group baseline's steps interleaved in this process, stored as the paper's unit (minutes per 50 steps) with the
    ratios to the baseline."""
    import torch

    from results import MetricRecord
    from . import probes

    c = job.config
    where = dict(batch=recipe.cost_batch or c["per_device_batch"], resolution=None)
    out = {}
    for name, cfg in cfgs.items():
        log(f"memory probe of {name}")
        make = functools.partial(dense_train_step, cfg.to_dict(), device)
        out[name] = [probes.probe_step_memory(make, device, recipe.cost_warmup, recipe.memory_cap_gb,
                                              what=f"; one {task_of(c['dense']['config'])} train_step",
                                              **where)]
    fitting = {name: dense_train_step(cfg.to_dict(), device) for name, cfg in cfgs.items() if not out[name][0].oom}
    load = probes.Load.start()
    log(f"timing {', '.join(fitting)} interleaved")
    times = probes._interleaved(fitting, device, recipe.cost_warmup, recipe.cost_steps)
    load.stop()
    for name in cfgs:
        ts = times.get(name)
        if ts is None:
            out[name].append(probes.Measurement("time_per_50_steps", None, "min", "not timed: OOM", oom=True,
                                                **where))
            continue
        q1, median, q3 = probes._quartiles(ts)
        out[name].append(probes.Measurement(
            "time_per_50_steps", 50 * median / 60, "min",
            f"50 x the median of {recipe.cost_steps} timed MMEngine train_steps (forward, losses, backward, "
            f"optimizer step on one fixed batch of the train loader) after {recipe.cost_warmup} warm-up, "
            f"synchronised, {torch.get_num_threads()} threads"
            + (f", interleaved with {len(fitting) - 1} other model(s)" if len(fitting) > 1 else ""),
            extra={"time_per_50_steps_iqr": 50 * (q3 - q1) / 60}, threads=torch.get_num_threads(),
            samples=ts, **where))
    row, base = c["row"], (c["baseline"] or {}).get("row")
    records = [MetricRecord(m.name, m.value, m.unit, method=m.method, device=probes.device_name(device),
                            dtype="float32") for m in load.measurements()]
    for m in out[row]:
        context = dict(device=probes.device_name(device), dtype="float32", batch=m.batch, threads=m.threads)
        records.append(MetricRecord(m.name, m.value, m.unit, method=m.method, **context))
        records += [MetricRecord(k, v, m.unit, method=m.method, **context) for k, v in m.extra.items()]
        ref = {r.name: r for r in out[base]}.get(m.name) if base else None
        if ref is None or m.value is None or ref.value is None:
            continue
        if base == row:
            ratio = probes.Measurement(f"{m.name}_ratio", 1.0, "x", f"the group's baseline ({base}): 1 by definition")
        elif m.name == "train_memory":
            ratio = probes.Measurement("train_memory_ratio", m.value / ref.value, "x",
                                       f"train_memory / that of {base}, both measured in fresh children")
        else:
            ratio = probes.paired_ratio(f"{m.name}_ratio", m, ref, base)
        records.append(MetricRecord(ratio.name, ratio.value, "x", method=ratio.method, **context))
        records += [MetricRecord(k, v, "x", method=ratio.method, **context) for k, v in ratio.extra.items()]
    store.log_metrics(claim.run_id, records, owner=claim.owner)
    if load.busy:
        log(f"warning: the machine was busy: {load.describe()}")


def run_config(job, row: dict, data_root: Path, work_dir: Path, pretrained: str | None, distributed: bool = False):
    """The MMEngine config of ``row`` (``{"arch", "rep", "variant"}``: the job's row or its baseline) in ``job``."""
    from suites import DenseRecipe
    c = job.config
    recipe = DenseRecipe.from_dict(c["recipe"])
    from backbones.networks import ARCHS
    from .finetune import MM_BACKBONES
    arch = row["arch"]
    backbone = dict(type=MM_BACKBONES[ARCHS[arch].family], arch=arch, rep=row["rep"], variant=row["variant"],
                    freeze=c["dense"]["freeze"], pretrained=pretrained)
    return dense_config(c["dense"]["config"], data_root, work_dir, backbone=backbone, iters=recipe.iters,
                        batch=c["per_device_batch"], scale=recipe.image_scale, constant_lr=recipe.constant_lr,
                        seed=c["seed"], lr=c["lr"], grad_accum=c["grad_accum"], distributed=distributed,
                        options=c["dense"].get("cfg_options"), quiet=recipe.iters is not None)


METRIC_NAMES = {"bbox_mAP": "map", "mIoU": "miou"}  # the runner's metric -> the suite's (mAP in %, as printed)


def execute(store, claim, job, device: str, dist) -> str:
    """One dense row: its data (generated tiny or checked), its pretrained backbone (verified against the sha256
    the run was planned with, recorded as the run's ``input_weights``), the cost probes (seed 0, rank 0), training
    and evaluation with the config's metric, then the trained model deployed (every repbench block of the backbone
    in its inference form) and evaluated again: both stored, they must agree. Returns the run's status."""
    import torch

    from results import MetricRecord
    from suites import DenseRecipe
    from . import probes
    from .jobs import sha256_of

    c = job.config
    recipe = DenseRecipe.from_dict(c["recipe"])
    task = task_of(c["dense"]["config"])
    data_root = Path(job.data_root)
    run_dir = job.run_dir
    log_file = run_dir / "run.log"

    def log(line: str) -> None:
        line = f"{job.label}: {line}"
        print(line, file=sys.__stdout__, flush=True)  # also while a quiet run hushes MMEngine's stdout
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    if dist.is_main:
        ensure_data(task, recipe, data_root)
    if dist.distributed:
        torch.distributed.barrier()
    pretrained = None
    if c.get("pretrained"):
        pretrained = job.pretrained_file
        if not pretrained or not Path(pretrained).is_file() or sha256_of(Path(pretrained)) != c["pretrained"]["sha256"]:
            raise RuntimeError(f"the pretrained checkpoint {pretrained} is missing or changed since the run was "
                               f"planned (sha256 {c['pretrained']['sha256'][:12]})")
        if dist.is_main:
            store.log_artifact(claim.run_id, "input_weights", str(pretrained), Path(pretrained).stat().st_size,
                               c["pretrained"]["sha256"], None, owner=claim.owner)
    context = dict(device=probes.device_name(device), dtype="float32", batch=c["global_batch"])
    if dist.is_main and c["seed"] == 0:
        cfgs = {c["row"]: run_config(job, c, data_root, run_dir / "probe", pretrained)}
        if c["baseline"] and c["baseline"]["row"] != c["row"]:
            cfgs[c["baseline"]["row"]] = run_config(job, c["baseline"], data_root, run_dir / "probe", None)
        _measure_costs(store, claim, job, recipe, cfgs, device, log)
    if dist.is_main and c.get("pretrained", {}).get("top1") is not None and "top1" in c["metrics"]:
        p = c["pretrained"]
        store.log_metrics(claim.run_id, owner=claim.owner, records=[MetricRecord(
            "top1", p["top1"], "%", method=f"top-1 of the classification run the backbone starts from ({p['table']} "
            f"/ {p['row']} at {p['scale']}, run {p['run_key'][:12]}): lineage, not measured here", **context)])
    cfg = run_config(job, c, data_root, run_dir / "mmengine", pretrained, dist.distributed)
    cfg.resume = recipe.iters is None  # a long (paper) run resumes from the config's checkpoints in its work_dir
    log(f"training {task} {Path(c['dense']['config']).name} with {c['arch']}/{c['rep']}: "
        f"{cfg.train_cfg.get('max_iters', cfg.train_cfg.get('max_epochs'))} "
        f"{'iterations' if 'max_iters' in cfg.train_cfg else 'epochs'}, {c['world_size']} process(es) x "
        f"{c['grad_accum']} x {c['per_device_batch']} = global batch {c['global_batch']}, lr {c['lr']:g}, "
        f"pretrained: {c['pretrained']['table'] + ' / ' + c['pretrained']['row'] if c.get('pretrained', {}).get('table') else ('file' if pretrained else 'none')}")
    hooks = []
    if c.get("dyrep"):  # DyRep grows the backbone during the finetuning (DyRep Table 5's "D"); events stored
        from dataclasses import asdict

        from .dyrep import DyRepHook
        d = c["dyrep"]

        def on_events(events):
            store.log_events(claim.run_id, [asdict(e) for e in events], owner=claim.owner)
            for e in events:
                log(f"DyRep after step {e.epoch + 1}: {e.kind} {e.site} {' '.join(e.branches)}")

        hooks.append(DyRepHook(metric=d["metric"], rule=d["rule"], gamma=d["gamma"], recal_batches=d["recal_batches"],
                               seed=c["seed"], dep=d["dep"], on_events=on_events if dist.is_main else None,
                               module="backbone.net", ops=d.get("ops", "dyrep"), every=recipe.dyrep_every,
                               until=recipe.dyrep_until))
    runner, metrics = train_and_evaluate(cfg, hooks)
    how = (f"on {len(runner.val_dataloader.dataset)} {TASKS[task]} val images after {runner.iter} steps "
           f"({c['world_size']} process(es) x {c['grad_accum']} x {c['per_device_batch']}, lr {c['lr']:g}; "
           f"MMEngine Runner, {'mmdet CocoMetric' if task == 'mmdet' else 'mmseg IoUMetric'})")
    (key, value), = metrics.items()
    value = 100 * value if key == "bbox_mAP" else value
    model = getattr(runner.model, "module", runner.model)
    model.backbone.switch_to_deploy()
    with contextlib.redirect_stdout(io.StringIO()) if recipe.iters is not None else contextlib.nullcontext():
        deployed = runner.val_loop.run()
    dkey = METRIC_KEYS[task][0]
    dvalue = (100 * float(deployed[dkey]) if key == "bbox_mAP" else float(deployed[dkey])) if dkey in deployed else 0.0
    if dist.is_main:
        name = METRIC_NAMES[key]
        store.log_metrics(claim.run_id, owner=claim.owner, records=[
            MetricRecord(name, value, "%", method=f"{key} of the trained (training-form) model {how}", **context),
            MetricRecord(f"{name}_deployed", dvalue, "%", method=f"{key} of the same model deployed {how}",
                         **context)])
        log(f"finished: {key} {value:.2f} (deployed {dvalue:.2f})")
        if log_file.is_file():
            store.log_artifact(claim.run_id, "log", str(log_file), log_file.stat().st_size, sha256_of(log_file),
                               None, owner=claim.owner)
    return "finished"
