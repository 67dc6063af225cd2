"""``run_suite evaluate --checkpoint PATH --source SOURCE --arch ARCH --rep REP``: the top-1 of published weights.

An official checkpoint (backbones/official.py maps it onto this suite's model, exactly) is evaluated on the ImageNet
validation set — or any ImageFolder of validation images (``--images``) — with its source's evaluation transform,
and stored as a run of the table ``repbench.published`` (row ``<arch>:<rep>[:<variant>]/<source>``) with the file's
sha256, its source and the transform. Every table's report then shows the value as "published weights" beside the
paper's and the measured one, in each row with the same arch, rep and variant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

KEY = "repbench.published"
# The evaluation transform of each source's own code (../shared/reference/official-code-notes.md): resize to
# resolution / crop, centre-crop the resolution. OREPA and DBB: Resize 256 + CentreCrop 224 (crop 0.875); RepVGG's
# main.py and RepOptimizers: Resize(224) + CentreCrop(224) (crop 1.0; RepVGG's older test.py used 256 / 224).
EVAL_CROP = {"orepa": 0.875, "dbb": 0.875, "repvgg": 1.0, "repopt": 1.0}
RESOLUTION = 224


def parser() -> argparse.ArgumentParser:
    from backbones.official import SOURCES
    p = argparse.ArgumentParser(prog="run_suite evaluate",
                                description="Evaluate an official checkpoint's top-1 in this suite's harness and "
                                            "store it as 'published weights'.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="the official file (.pth / .pth.tar)")
    p.add_argument("--source", required=True, choices=SOURCES, help="the repository that wrote it")
    p.add_argument("--arch", required=True, help="e.g. repvgg_a0, resnet18 ('run_suite list' shows archs)")
    p.add_argument("--rep", required=True, help="e.g. repvgg, orepa, dbb")
    p.add_argument("--variant", help="a variant preset of the rep (default: the paper's main method)")
    p.add_argument("--data-root", help="holds imagenet/val (default: $REPBENCH_DATA, else data/)")
    p.add_argument("--images", metavar="DIR", help="an ImageFolder of validation images instead of "
                                                   "<data-root>/imagenet/val (class folders sorted = label order)")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="evaluation processes (DDP: each evaluates every N-th image, the counts are summed)")
    p.add_argument("--db", help="database URL (same precedence as runs)")
    p.add_argument("--artifacts", metavar="DIR", help="logs (same default as runs)")
    return p


def row_name(arch: str, rep: str, variant: str | None, source: str) -> str:
    return f"{arch}:{rep}" + (f":{variant}" if variant else "") + f"/{source}"


def table(rows=()):
    """The ``repbench.published`` table (its rows: the evaluated checkpoints)."""
    from suites import Recipe, Table
    recipe = Recipe(dataset="imagenet", resolution=RESOLUTION, batch=64, epochs=0, train_accuracy=False,
                    checkpoints=False)
    return Table("repbench", "published", "Published weights evaluated in this suite's harness (run_suite evaluate)",
                 "the official checkpoints", ("top1",), tuple(rows), {"paper": recipe}, paper_regime=None)


def table_from_store(store):
    """The table with one row per evaluated checkpoint in ``store`` (for ``run_suite report published``)."""
    from suites import Row
    rows = {}
    for run in store.runs_frame(KEY).itertuples():
        params = store.params_of(run.id)
        variant = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("variant.")} or None
        rows.setdefault(run.row_name, Row(run.row_name, params["arch"], params["rep"], variant))
    return table(rows.values())


def plan_job(args, images: Path, url: str, artifacts: str):
    """The evaluation as a job (jobs.Job) of ``repbench.published``, from checked arguments."""
    from results import RunSpec
    from suites import Row
    from .jobs import Job, _model_of, code_fingerprint, config_hash, run_key, sha256_of
    row = Row(row_name(args.arch, args.rep, args.variant, args.source), args.arch, args.rep, args.variant)
    checkpoint = Path(args.checkpoint).resolve()
    c = {"table": KEY, "row": row.name, "scale": "paper", "seed": 0, **_model_of(row), "baseline": None,
         "published": {"source": args.source, "sha256": sha256_of(checkpoint), "file": checkpoint.name,
                       "resolution": RESOLUTION, "eval_crop": EVAL_CROP[args.source]},
         "world_size": args.devices, "metrics": ["top1"], "code": code_fingerprint()}
    chash = config_hash({k: v for k, v in c.items() if k != "seed"})
    spec = RunSpec(run_key(KEY, row.name, "paper", 0, chash), KEY, row.name, "paper", 0, chash, c)
    return Job(spec, c, str(images), url, "local", artifacts_root=artifacts, pretrained_file=str(checkpoint)), \
        table((row,))


def image_folder(images: Path, crop: float):
    from torchvision import datasets, transforms

    from .data import MEAN, STD
    return datasets.ImageFolder(images, transforms.Compose([
        transforms.Resize(round(RESOLUTION / crop)), transforms.CenterCrop(RESOLUTION), transforms.ToTensor(),
        transforms.Normalize(MEAN, STD)]))


def execute(store, claim, job, device: str, dist=None, log=print) -> None:
    """Load the checkpoint (sha256 checked against the planned one), evaluate it, record top-1 and the file. In a
    process group (``dist``) every rank evaluates every world-th image and the counts are summed; rank 0 writes."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from backbones.deploy import form_of
    from backbones.official import from_official
    from results import MetricRecord
    from .jobs import sha256_of
    from .probes import device_name

    c, p = job.config, job.config["published"]
    path = Path(job.pretrained_file)
    sha = sha256_of(path)
    if sha != p["sha256"]:
        raise RuntimeError(f"{path} changed since it was planned (sha256 {sha[:12]}, planned {p['sha256'][:12]})")
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.distributed else (0, 1)
    if rank == 0:
        store.log_artifact(claim.run_id, "input_weights", str(path), path.stat().st_size, sha, 0, owner=claim.owner)
    variant = {k: v for k, v in c["variant"].items()} if c.get("variant") else None
    model = from_official(path, c["arch"], c["rep"], p["source"], variant=variant).to(device)
    data = image_folder(Path(job.data_root), p["eval_crop"])
    hits = total = 0
    with torch.inference_mode():
        for x, y in DataLoader(Subset(data, range(rank, len(data), world)), batch_size=64,
                               num_workers=min(4, torch.get_num_threads())):
            hits += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            total += len(y)
    if world > 1:
        counts = torch.tensor([hits, total], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        hits, total = (int(v) for v in counts.tolist())
    if rank:
        return
    log(f"{job.label}: top-1 {100 * hits / total:.2f}% on {total} images")
    store.log_metrics(claim.run_id, [MetricRecord(
        "top1", 100 * hits / total, "%", device=device_name(device), batch=64, resolution=RESOLUTION, dtype="float32",
        method=f"published weights ({p['source']}, {path.name}, sha256 {sha[:12]}) in their {form_of(model)} "
               f"form; top-1 on {total} images of "
               f"{job.data_root}" + (f" ({world} processes, each every {world}-th image)" if world > 1 else "")
               + f"; Resize({round(RESOLUTION / p['eval_crop'])}) + CentreCrop({RESOLUTION}), the source's "
               "evaluation transform")], owner=claim.owner)
