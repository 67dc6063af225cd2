"""Paper scale: DDP is the paper's protocol, recipes keep their global batch, checkpoints survive a kill.

Real processes everywhere: gloo process groups on CPU, MMEngine's Runner, SIGKILL / SIGTERM sent to a real training
process, checkpoints written to disk and truncated by hand.
"""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from runners.launch import DistEnv, accumulation, free_port, valid_device_counts
from suites import Recipe

ROOT = Path(__file__).resolve().parent.parent


def write_imagefolder(root: Path, train: int, val: int, classes: int = 3, size: int = 8, seed: int = 0) -> Path:
    """A tiny ImageFolder in the real on-disk format under ``root/synthetic`` (what the smoke dataset reads)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            folder = root / "synthetic" / split / f"{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def small_bn_net(seed: int = 0, dtype=torch.float64, kind: str = "small") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "orepa":  # every OREPA block kind: deep stem, online kxk blocks, scaling vectors
        from backbones import build_classifier
        return build_classifier("resnet18", "orepa", num_classes=3).to(dtype)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).to(dtype)


RECIPE = Recipe(dataset="synthetic", resolution=8, batch=4, devices=2, epochs=2, warmup_iters=1, lr=0.1,
                weight_decay=1e-4, checkpoints=False)


def _train_rank(rank: int, world: int, accum: int, port: int, root: str, out: str, kind: str) -> None:
    from runners.launch import destroy_process_group, init_process_group
    from runners.train import train_classifier
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = DistEnv(rank, world, rank, world)
    init_process_group(dist, "cpu", timeout_s=120)
    net = small_bn_net(kind=kind)
    result = train_classifier(net, RECIPE, Path(root), seed=3, device="cpu", dist=dist, grad_accum=accum)
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in net.named_parameters()},
                    "val_images": result.val_images, "loss": result.train_loss}, out)
    destroy_process_group()


def _run_group(world: int, accum: int, root: Path, out: Path, kind: str) -> dict:
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_train_rank, args=(r, world, accum, port, str(root), str(out), kind))
                 for r in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(300)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["small", "orepa"])
def test_two_process_ddp_equals_one_process_accumulating(tmp_path, kind):
    """The paper's protocol: optimizer steps of 2 processes x batch 4 (gloo DDP, per-device BN) give the same
    parameters as 1 process accumulating the same two micro-batches of 4 (float64, rel err <= 1e-10) -- here 4
    steps over 2 epochs (warm-up, momentum, cosine, bias lr x2, weight decay); validation over 2 processes counts
    each of the 7 validation images exactly once (no padded duplicate)."""
    write_imagefolder(tmp_path, train=16, val=7)
    ddp = _run_group(2, 1, tmp_path, tmp_path / "ddp.pt", kind)
    accumulated = _run_group(1, 2, tmp_path, tmp_path / "acc.pt", kind)
    start = dict(small_bn_net(kind=kind).named_parameters())
    assert ddp["params"].keys() == accumulated["params"].keys()
    for name, value in ddp["params"].items():
        reference = accumulated["params"][name]
        assert not torch.equal(reference, start[name].detach()), f"{name} did not train"
        err = ((value - reference).abs().max() / reference.abs().max()).item()
        assert err <= 1e-10, f"{name}: rel err {err}"
    assert ddp["val_images"] == accumulated["val_images"] == 7
    assert abs(ddp["loss"] - accumulated["loss"]) <= 1e-10 * abs(accumulated["loss"])


def test_step_sampler_covers_each_global_batch_once():
    """Across ranks and accumulated micro-batches every image of a global batch is read exactly once, in the
    same global batches whatever the device count; a resume position skips whole micro-batches."""
    from runners.train import StepSampler
    size, batch, global_batch = 50, 3, 12

    def global_batches(world, accum):
        streams = [list(StepSampler(size, batch, world, r, accum, seed=5)) for r in range(world)]
        steps = []
        for s in range(size // global_batch):
            images = []
            for r in range(world):
                images += streams[r][s * batch * accum:(s + 1) * batch * accum]
            steps.append(sorted(images))
        return steps

    reference = global_batches(1, 4)
    assert all(len(set(step)) == global_batch for step in reference)
    assert global_batches(2, 2) == reference == global_batches(4, 1)
    sampler = StepSampler(size, batch, 2, 1, 2, seed=5)
    full = list(sampler)
    sampler.resume_at(0, 2)
    assert len(sampler) == len(full) - 2 * batch and list(sampler) == full[2 * batch:]
    sampler.set_epoch(1)
    assert list(sampler) != full and len(sampler) == len(full)


def test_batch_arithmetic_keeps_the_global_batch():
    assert valid_device_counts(256, 64) == [1, 2, 4]
    assert accumulation(256, 64, 1) == 4 and accumulation(256, 64, 2) == 2 and accumulation(256, 64, 4) == 1
    with pytest.raises(ValueError, match="valid counts: 1, 2, 4"):
        accumulation(256, 64, 3)
    with pytest.raises(ValueError, match="valid counts: 1, 2, 4"):
        accumulation(256, 64, 8)


def test_launcher_agnostic_rank_discovery():
    assert DistEnv.from_env({}) == DistEnv()
    assert DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == \
        DistEnv(3, 4, 1, 2)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert DistEnv.from_env(slurm) == DistEnv(5, 8, 1, 4)


def test_loader_settings_follow_the_cpus_the_process_may_use(monkeypatch):
    from runners.launch import loader_settings
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert loader_settings(DistEnv(0, 4, 0, 4), "cuda:0", "imagenet") == dict(
        num_workers=5, pin_memory=True, prefetch_factor=2, multiprocessing_context="fork")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader_settings(DistEnv(0, 2, 0, 2), "cpu", "imagenet")["num_workers"] == 7  # 16 CPUs / 2 processes - 1
    assert loader_settings(DistEnv(), "cpu", "imagenet")["num_workers"] == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert loader_settings(DistEnv(0, 2, 0, 2), "cpu", "cifar10") == dict(num_workers=0, pin_memory=False)
    assert loader_settings(DistEnv(), "cpu", "digits")["num_workers"] == 0  # generated data: no workers


# -- checkpoints and resume ----------------------------------------------------------------------------------------

TRAINER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from test_scale import CKPT_RECIPE, small_bn_net
    from runners.train import Preempted, train_classifier

    class Slow(nn.Module):  # slow enough that a kill lands half-way
        def __init__(self, net, delay):
            super().__init__()
            self.net, self.delay = net, delay
        def forward(self, x):
            time.sleep(self.delay)
            return self.net(x)

    torch.set_num_threads(1)
    root, out, run_dir, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    model = Slow(small_bn_net(dtype=torch.float32), delay)
    try:
        result = train_classifier(model, CKPT_RECIPE, Path(root), seed=1, run_dir=Path(run_dir),
                                  log=lambda line: print(line, flush=True))
    except Preempted as e:
        print("PREEMPTED", e, flush=True)
        sys.exit(3)
    torch.save({{"params": {{k: v.detach().clone() for k, v in model.named_parameters()}},
                "top1": result.top1, "loss": result.train_loss, "epochs": len(result.epochs),
                "history": [(r["epoch"], r["step"], r["train_loss"], r["top1"]) for r in result.epochs]}}, out)
""")
CKPT_RECIPE = Recipe(dataset="synthetic", resolution=8, batch=2, devices=1, epochs=4, lr=0.05, warmup_epochs=0.5,
                     checkpoints=True)


def _trainer(tmp_path, run_dir, out, delay=0.0):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.format(tests=str(ROOT / "tests")))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path), str(out), str(run_dir), str(delay)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path_glob, folder: Path, count: int, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list(folder.glob(path_glob))) >= count:
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"no {count} x {path_glob} in {folder} within {timeout} s")


@pytest.mark.slow
def test_kill_resume_truncate_and_preempt_end_like_an_uninterrupted_run(tmp_path):
    """CPU, fixed seed: an uninterrupted run; a run killed with SIGKILL after epoch 2's checkpoint whose newest
    checkpoint is then truncated (the re-run warns and resumes from epoch 1); a run stopped by SIGTERM mid-epoch
    (checkpoint at the step boundary, then resumed). All end with the same parameters, top-1 and loss."""
    write_imagefolder(tmp_path, train=12, val=6)  # 3 steps of 2 x 2 per epoch
    reference = _trainer(tmp_path, tmp_path / "ref", tmp_path / "ref.pt")
    assert reference.wait(300) == 0, reference.stdout.read()
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert ref["epochs"] == 4

    # SIGKILL after two epoch checkpoints, then truncate the newest
    killed_dir = tmp_path / "killed"
    process = _trainer(tmp_path, killed_dir, tmp_path / "killed.pt", delay=0.15)
    _wait_for("state-e0002-*.pth.sha256", killed_dir / "checkpoints", 1, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = sorted((killed_dir / "checkpoints").glob("state-*.pth"))[-1]
    assert "e0002" in newest.name
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    again = _trainer(tmp_path, killed_dir, tmp_path / "killed.pt")
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log
    assert "corrupt or truncated" in log and "resuming from state-e0001" in log and "epoch 1 of 4 done" in log
    resumed = torch.load(tmp_path / "killed.pt", weights_only=True)

    # SIGTERM mid-epoch: the run writes a checkpoint at the next step boundary and stops
    term_dir = tmp_path / "term"
    process = _trainer(tmp_path, term_dir, tmp_path / "term.pt", delay=0.15)
    _wait_for("state-e0001-*.pth.sha256", term_dir / "checkpoints", 1, process)
    time.sleep(0.5)  # into epoch 2
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 3 and "PREEMPTED" in log, log
    state = torch.load(sorted((term_dir / "checkpoints").glob("state-*.pth"))[-1], weights_only=True)
    assert state["micro_in_epoch"] > 0 and state["epoch"] >= 1  # a step boundary inside an epoch after the first
    again = _trainer(tmp_path, term_dir, tmp_path / "term.pt")
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "steps into epoch" in log, log
    preempted = torch.load(tmp_path / "term.pt", weights_only=True)

    for other in (resumed, preempted):
        assert other["top1"] == ref["top1"] and other["loss"] == ref["loss"]
        assert other["history"] == ref["history"]  # every epoch's loss and top-1, not only the last
        for name, value in ref["params"].items():
            assert torch.equal(other["params"][name], value), name


@pytest.mark.parametrize("bn_biases", [True, False])
def test_official_lr_and_decay_rules(bn_biases):
    """OREPA's code: lr x2 on every parameter named "bias" (BN biases too), no decay on biases or BN weights, decay
    on everything else, the scaling vectors included; the mmengine rule (skipping BN biases) is the alternative."""
    from mmengine.optim import build_optim_wrapper

    from backbones import build_classifier
    from runners.train import optim_wrapper_cfg
    recipe = replace(RECIPE, lr=0.1, weight_decay=1e-4, bias_lr_mult_norm=bn_biases)
    model = build_classifier("resnet50", "orepa", num_classes=10)
    wrapper = build_optim_wrapper(model, optim_wrapper_cfg(recipe, grad_accum=3))
    assert wrapper._accumulative_counts == 3
    by_param = {id(p): g for g in wrapper.optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    kinds = {"bn_bias": "layer1.0.conv2.post_bn.bias", "bn_weight": "layer1.0.conv2.post_bn.weight",
             "fc_bias": "fc.bias", "scale": "layer1.0.conv2.scale", "rep1x1_scale": "layer1.0.conv1.scale",
             "conv": "layer1.0.conv2.branches.origin.weight", "stem_scale": "stem.layers.0.scale"}
    group = {kind: by_param[id(names[name])] for kind, name in kinds.items()}
    assert group["bn_bias"]["lr"] == pytest.approx(0.2 if bn_biases else 0.1)
    assert group["fc_bias"]["lr"] == pytest.approx(0.2)
    assert group["bn_bias"]["weight_decay"] == 0 and group["fc_bias"]["weight_decay"] == 0
    assert group["bn_weight"]["weight_decay"] == 0 and group["bn_weight"]["lr"] == pytest.approx(0.1)
    for kind in ("scale", "rep1x1_scale", "conv", "stem_scale"):
        assert group[kind]["weight_decay"] == pytest.approx(1e-4) and group[kind]["lr"] == pytest.approx(0.1), kind


@pytest.mark.parametrize("clip", [None, 1.0])
def test_gradient_clipping_bounds_the_step(clip):
    from mmengine.optim import build_optim_wrapper

    from runners.train import optim_wrapper_cfg
    recipe = replace(RECIPE, lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad=clip)
    model = nn.Linear(4, 2, bias=False)
    before = model.weight.detach().clone()
    wrapper = build_optim_wrapper(model, optim_wrapper_cfg(recipe))
    wrapper.update_params((1000 * model(torch.ones(1, 4))).sum())  # gradient norm 1000 * sqrt(8)
    moved = float((model.weight.detach() - before).norm())
    assert moved == pytest.approx(1.0 if clip else 1000 * 8 ** 0.5, rel=1e-5)


@pytest.mark.slow
def test_a_checkpointing_run_records_its_artifacts_and_force_starts_over(tmp_path, monkeypatch):
    """Through the job entry point: a 2-epoch run with checkpoints stores per-epoch top-1 and loss with their step,
    records its checkpoints while it trains and, once finished, keeps its log and final weights (train and deploy
    form, loadable strictly) with size and sha256 and drops the resume-only checkpoints; a fresh (--force) run
    removes old checkpoints before it starts."""
    from backbones import build_classifier, deploy, load_checkpoint
    from results import Store
    from runners.jobs import execute, plan
    from runners.train import STATE_FORMAT, sha256_of, write_checkpoint
    from suites.base import Row, Table

    write_imagefolder(tmp_path, train=8, val=4, size=32)
    recipe = Recipe(dataset="synthetic", resolution=32, batch=2, devices=2, epochs=2, warmup_iters=1,
                    cost_resolution=32, cost_steps=1, latency_batch=1, throughput_batch=2)
    table = Table("orepa", "tiny", "tiny", "test", ("top1",), (Row("R/None", "resnet18", "none"),),
                  {"mini": recipe})
    url = f"sqlite:///{tmp_path}/r.sqlite"
    store = Store(url)
    (job,) = plan(table, "mini", 1, None, str(tmp_path), url, devices=1, artifacts_root=str(tmp_path / "art"))
    job.run_id = store.ensure_run(job.spec).id
    assert job.config["grad_accum"] == 2 and job.config["global_batch"] == 4
    recorded = []
    log_artifact = Store.log_artifact
    monkeypatch.setattr(Store, "log_artifact", lambda self, run_id, kind, *a, **k: (
        recorded.append(kind), log_artifact(self, run_id, kind, *a, **k))[1])
    assert execute(job) == "finished"
    assert recorded.count("checkpoint") == 2  # one per epoch, recorded as it was written
    history = store.metrics_frame("orepa.tiny", history=True)
    assert sorted(history[history.name == "top1"].step) == [2, 4]  # 2 optimizer steps per epoch
    assert sorted(history[history.name == "train_loss"].step) == [2, 4]
    artifacts = store.artifacts_frame(job.run_id)
    assert sorted(artifacts.kind) == ["log", "weights_deploy", "weights_train"]
    assert not list((job.run_dir / "checkpoints").glob("state-*"))
    for artifact in artifacts.itertuples():
        path = Path(artifact.path)
        assert path.parent.is_relative_to(job.run_dir) and path.stat().st_size == artifact.size_bytes
        assert sha256_of(path) == artifact.sha256
    weights = dict(zip(artifacts.kind, artifacts.path))
    load_checkpoint(build_classifier("resnet18", "none", 4), weights["weights_train"])
    load_checkpoint(deploy(build_classifier("resnet18", "none", 4)), weights["weights_deploy"])
    # a verified checkpoint a plain re-run would resume from: --force must remove it first
    marker, _, _ = write_checkpoint({"format": STATE_FORMAT, "epoch": 9}, job.run_dir / "checkpoints",
                                    "state-e0009-s000000099.pth")
    job.fresh = True
    assert execute(job) == "finished"
    assert not marker.exists() and "resuming" not in (job.run_dir / "run.log").read_text()
    assert not list((job.run_dir / "checkpoints").glob("state-*"))
    assert len(store.artifacts_frame(job.run_id)) == 3
    store.close()
