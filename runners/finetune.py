"""``run_suite finetune CONFIG --backbone ARCH:REP[:VARIANT]``: one backbone in one mm config, no suite table needed.

The run goes through the same job path as a dense table's row (runners/dense.py): the data checked, the backbone's
checkpoint verified by its sha256 and recorded as the run's input, the cost probes, training through MMEngine's
Runner, evaluation with the config's metric, and the model deployed and evaluated again. It is stored under the table
``repbench.finetune`` with the row ``<config>/<arch>:<rep>[:<variant>]``; ``run_suite report finetune`` shows every
such run with its lineage. Its scale is ``paper`` when the config's own schedule, batch and images run, ``mini``
when ``--iters``, ``--batch`` or ``--image-scale`` change them.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

KEY = "repbench.finetune"
METRICS = ("top1", "map", "miou", "train_memory", "time_per_50_steps")
MM_BACKBONES = {"resnet": "repbench.ResNet", "repvgg": "repbench.RepVGG"}  # arch family -> mm backbone type


def parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(prog="run_suite finetune",
                                description="Finetune one repbench backbone in one MMDetection / MMSegmentation "
                                            "config, store the run, then deploy the model and evaluate it again.")
    p.add_argument("config", help="an mm config: a path, or a name under configs/ (e.g. "
                                  "mmdet/faster-rcnn_repbench-orepa-r50_fpn_1x_coco.py)")
    p.add_argument("--backbone", required=True, metavar="ARCH:REP[:VARIANT]",
                   help="the backbone, e.g. resnet50:orepa or resnet50:orepa:deep_stem ('run_suite list' shows archs)")
    p.add_argument("--pretrained", metavar="PATH", help="a repbench classification checkpoint (train or deploy form) "
                                                        "the backbone starts from, loaded strictly")
    p.add_argument("--data-root", help="holds coco/ or cityscapes/ (default: $REPBENCH_DATA, else data/)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
                   help="override config fields, as MMEngine's tools/train.py (e.g. train_cfg.max_iters=100)")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="processes (one per device); the config's global batch is kept by accumulation")
    p.add_argument("--iters", type=int, help="train this many steps instead of the config's schedule (scale mini)")
    p.add_argument("--batch", type=int, help="images per device instead of the config's; lr scaled linearly")
    p.add_argument("--image-scale", type=_scale, metavar="W,H",
                   help="resize (and crop) the images to W,H instead of the config's scale (scale mini)")
    p.add_argument("--freeze", default="paper", choices=("paper", "fair"),
                   help="the freezing reading (backbones/mm.py frozen_indices; default paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", help="database URL (same precedence as runs)")
    p.add_argument("--artifacts", metavar="DIR", help="logs and work dirs (same default as runs)")
    return p


def _scale(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected W,H (e.g. 128,96)") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 32,32")
    return w, h


def parse_backbone(text: str) -> tuple[str, str, str | None]:
    """``ARCH:REP[:VARIANT]`` -> (arch, rep, variant); ValueError (one line) for an unknown arch, rep or variant,
    or an arch no mm backbone wraps."""
    from backbones import resolve_variant
    from backbones.networks import ARCHS
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--backbone {text!r}: expected ARCH:REP or ARCH:REP:VARIANT (e.g. resnet50:orepa)")
    arch, rep, variant = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    if arch not in ARCHS:
        raise ValueError(f"--backbone {text!r}: unknown arch {arch!r}")
    if ARCHS[arch].family not in MM_BACKBONES:
        raise ValueError(f"--backbone {text!r}: no mm backbone wraps the {ARCHS[arch].family} family (ResNet-style "
                         "and RepVGG-style archs do)")
    resolve_variant(rep, variant)  # ValueError for an unknown rep or variant
    return arch, rep, variant


def row_name(config: str, arch: str, rep: str, variant: str | None) -> str:
    return f"{Path(config).stem}/{arch}:{rep}" + (f":{variant}" if variant else "")


def table(rows, scale: str, recipe):
    """The ``repbench.finetune`` table of ``rows`` (suites.Row with their config) at ``scale``."""
    from suites import Table
    return Table("repbench", "finetune", "Finetuning runs of single backbones (run_suite finetune)",
                 "this suite (no paper)", METRICS, tuple(rows), {scale: recipe}, paper_regime=None, runner="dense")


def table_from_store(store):
    """The ``repbench.finetune`` table of every finetune run in ``store`` (its rows rebuilt from the runs' configs),
    for the report."""
    from suites import DenseRecipe, Row
    runs = store.runs_frame(KEY)
    rows, recipes = {}, {}
    for run in runs.itertuples():
        params = store.params_of(run.id)
        variant = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("variant.")} or None
        rows.setdefault(run.row_name, Row(run.row_name, params["arch"], params["rep"], variant,
                                          config=params["dense.config"]))
        recipes.setdefault(run.scale, DenseRecipe.from_dict(
            {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("recipe.")}))
    t = table(rows.values(), "paper", DenseRecipe())
    return type(t)(**{**{f: getattr(t, f) for f in t.__dataclass_fields__}, "recipes": recipes or t.recipes})


def plan_job(args, data_root: Path, url: str, artifacts: str, store):
    """The finetune run as a job (jobs.Job) and its one-row table, from checked arguments; a ``--pretrained`` file
    this suite wrote is traced to its run in ``store`` (the lineage)."""
    from results import RunSpec
    from suites import DenseRecipe, Row
    from . import dense
    from .jobs import Job, _model_of, code_fingerprint, config_hash, run_key, sha256_of
    arch, rep, variant = parse_backbone(args.backbone)
    config = str(args.config)
    path = dense.config_path(config)
    shortened = args.iters is not None or args.batch is not None or args.image_scale is not None
    scale = "mini" if shortened else "paper"
    recipe = DenseRecipe(iters=args.iters, batch=args.batch, image_scale=args.image_scale, data="real",
                         pretrained="none")
    row = Row(row_name(config, arch, rep, variant), arch, rep, variant, config=config, freeze=args.freeze)
    dense_block = {"config": config if path == dense.CONFIGS / config else str(path.resolve()),
                   "config_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "freeze": args.freeze,
                   **({"cfg_options": dict(args.cfg_options)} if args.cfg_options else {})}
    pretrained = None
    if args.pretrained:
        sha = sha256_of(Path(args.pretrained))
        pretrained = {"sha256": sha, "source": "file", **dense.origin_of_file(store, sha)}
    c = {"table": KEY, "row": row.name, "scale": scale, "seed": args.seed, **_model_of(row), "baseline": None,
         "dense": dense_block, "recipe": recipe.as_dict(), **dense.batch_plan(recipe, config, args.devices, args.cfg_options),
         "metrics": list(METRICS), "code": code_fingerprint(), **({"pretrained": pretrained} if pretrained else {})}
    chash = config_hash({k: v for k, v in c.items() if k != "seed"})
    spec = RunSpec(run_key(KEY, row.name, scale, args.seed, chash), KEY, row.name, scale, args.seed, chash, c)
    job = Job(spec, c, str(data_root), url, "local", artifacts_root=artifacts,
              pretrained_file=str(Path(args.pretrained).resolve()) if args.pretrained else None)
    return job, table((row,), scale, recipe)
