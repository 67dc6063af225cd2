"""The measurement probes: one implementation each, used by every table and by the cost benchmark.

Protocol (DESIGN.md, "Measurement protocol"):

* time/batch: forward + backward + SGD step on one fixed batch, ``torch.set_num_threads`` fixed, >= 2 warm-up then
  >= 5 timed steps (smoke: 1 and 2), device synchronised; median and IQR; no data loading.
* memory: peak training memory of a step taken after >= 1 warm-up step (parameters, gradients, optimizer state,
  activations). CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: in a child process under a
  memory cap, the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs before the measured step)
  minus the child's RSS right after ``import torch``, before the model is built; the pure step difference is a
  second value. An OOM under the cap is a result ("OOM at budget X"), not a crash.
* params and MACs of the training and the deployed form (MACs counted on the meta device: no compute).
* latency (batch 1) and throughput of the deployed model.
* MaxBS: the largest batch that trains one step under the memory budget; bounded binary search.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

GIB = 2 ** 30
ModelFactory = Callable[[], nn.Module]


@dataclass
class Measurement:
    """One probe result: value(s) with unit and the exact way they were obtained."""

    name: str
    value: float | None
    unit: str
    method: str
    extra: dict = field(default_factory=dict)  # further named values of the same probe (same unit)
    oom: bool = False


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} cores)"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def make_train_step(model: nn.Module, batch: int, resolution: int, num_classes: int, device: str, lr: float = 0.01):
    """A closure doing one forward + backward + SGD (momentum) step on a fixed random batch."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def probe_train_time(model: nn.Module, batch: int, resolution: int, num_classes: int, device: str = "cpu",
                     warmup: int = 2, steps: int = 5) -> Measurement:
    return probe_train_time_interleaved({"model": model}, batch, resolution, num_classes, device, warmup,
                                        steps)["model"]


def probe_train_time_interleaved(models: dict[str, nn.Module], batch: int, resolution: int, num_classes: int,
                                 device: str = "cpu", warmup: int = 2, steps: int = 5) -> dict[str, Measurement]:
    """Time several models step by step in turn (A, B, C, A, B, C, ...), so that drift of the machine (clock,
    thermal, other load) hits every model alike; one model is the plain case."""
    train_steps = {name: make_train_step(m, batch, resolution, num_classes, device) for name, m in models.items()}
    for _ in range(warmup):
        for step in train_steps.values():
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name, step in train_steps.items():
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    how = (f"median of {steps} timed fwd+bwd+SGD steps after {warmup} warm-up, synchronised, fixed batch, "
           f"{torch.get_num_threads()} threads" + (f", interleaved with {len(models) - 1} other models"
                                                   if len(models) > 1 else ""))
    results = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        results[name] = Measurement("time_per_batch", statistics.median(ts), "s", how,
                                    extra={"time_per_batch_iqr": q[2] - q[0]})
    return results


# ---- memory ---------------------------------------------------------------------------------------------------------

def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_free_memory() -> None:
    """Give the allocator's cached free pages back to the kernel, so that RSS is live memory only."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak_rss() -> None:
    # RSS is then the live memory (weights, gradients, optimizer state), and the measured step's growth is its
    # activations, not what malloc kept from the warm-up.
    _release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


@contextmanager
def memory_cgroup(cap_bytes: int):
    """A fresh memory cgroup (v2 or v1) limited to ``cap_bytes``, or None where cgroups are not writable."""
    candidates = [(Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")]
    for root, limit_file in candidates:
        if not (root / limit_file).exists() and not (root / "cgroup.procs").exists():
            continue
        if root == Path("/sys/fs/cgroup") and not (root / "cgroup.controllers").exists():
            continue
        path = root / f"repbench-{os.getpid()}-{time.monotonic_ns()}"
        try:
            path.mkdir()
            (path / limit_file).write_text(str(cap_bytes))
        except OSError:
            if path.exists():
                path.rmdir()
            continue
        try:
            yield path
        finally:
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        return
    yield None


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass


def _capped_child(conn, cgroup: Path | None, cap_bytes: int, fn, args):
    _die_with_parent()
    # OpenMP's thread pool does not survive fork (a child of a parent that already ran parallel ops hangs), so the
    # child measures memory with one intra-op thread, as DataLoader workers do.
    torch.set_num_threads(1)
    if cgroup is not None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    else:
        vsize = _status_kib("VmSize") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vsize + cap_bytes, vsize + cap_bytes))
    try:
        conn.send(("ok", fn(*args)))
    except MemoryError:
        conn.send(("oom", None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_capped(fn, args: tuple, cap_bytes: int) -> tuple[str, object, str]:
    """Run ``fn(*args)`` in a forked child under a memory cap. Returns (status, result, cap method) with status
    ``ok``, ``oom`` (killed by the cgroup, exit 137, or MemoryError under RLIMIT_AS) or ``error``."""
    ctx = mp.get_context("fork")
    with memory_cgroup(cap_bytes) as cgroup:
        method = f"cgroup memory limit {cap_bytes / GIB:.1f} GiB" if cgroup else \
            f"RLIMIT_AS = virtual size + {cap_bytes / GIB:.1f} GiB"
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_capped_child, args=(send, cgroup, cap_bytes, fn, args))
        child.start()
        send.close()
        try:
            status, result = receive.recv()
        except EOFError:
            status, result = None, None
        child.join()
    if status is None:
        if child.exitcode in (-9, 137):
            return "oom", None, method
        return "error", f"memory probe child exited with code {child.exitcode}", method
    return status, result, method


def _measure_step_memory(factory: ModelFactory, batch: int, resolution: int, num_classes: int, device: str,
                         warmup: int):
    if device.startswith("cuda"):
        model = factory()
        step = make_train_step(model, batch, resolution, num_classes, device)
        for _ in range(warmup):
            step()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak, peak - before
    _release_free_memory()  # a parent that already worked leaves free heap pages behind; they are not ours
    baseline = _status_kib("VmRSS") * 1024  # right after import torch (forked from a fresh job process)
    model = factory()
    step = make_train_step(model, batch, resolution, num_classes, device)
    for _ in range(warmup):
        step()
    _reset_peak_rss()
    before = _status_kib("VmRSS") * 1024
    step()
    peak = _status_kib("VmHWM") * 1024
    return peak - baseline, peak - before


def probe_train_memory(factory: ModelFactory, batch: int, resolution: int, num_classes: int, device: str = "cpu",
                       warmup: int = 1, cap_gb: float = 16.0) -> Measurement:
    """Peak training memory in GiB (see the module docstring); ``extra['train_memory_step']`` is the growth during
    the measured step alone."""
    cap = int(cap_gb * GIB)
    if device.startswith("cuda"):
        method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        try:
            peak, step = _measure_step_memory(factory, batch, resolution, num_classes, device, warmup)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return Measurement("train_memory", None, "GiB", f"CUDA OOM; {method}", oom=True)
        return Measurement("train_memory", peak / GIB, "GiB", method, extra={"train_memory_step": step / GIB})
    status, result, cap_method = run_capped(_measure_step_memory,
                                            (factory, batch, resolution, num_classes, device, warmup), cap)
    method = (f"CPU child process (1 thread): VmHWM (reset via /proc/self/clear_refs before the step after {warmup} "
              f"warm-up) minus RSS after import torch; {cap_method}")
    if status == "oom":
        return Measurement("train_memory", None, "GiB", f"OOM at budget {cap_gb:g} GiB; {method}", oom=True)
    if status == "error":
        raise RuntimeError(result)
    peak, step = result
    return Measurement("train_memory", peak / GIB, "GiB", method, extra={"train_memory_step": step / GIB})


def probe_max_batch_size(factory: ModelFactory, resolution: int, num_classes: int, device: str = "cpu",
                         cap_gb: float = 16.0, low: int = 1, high: int = 1024) -> Measurement:
    """Largest batch in [low, high] that trains one step without OOM (CPU: under ``cap_gb``; not comparable with the
    papers' GPU numbers). Bounded binary search, each try in a capped child."""

    def fits(batch: int) -> bool:
        if device.startswith("cuda"):
            return not probe_train_memory(factory, batch, resolution, num_classes, device, 0, cap_gb).oom
        status, result, _ = run_capped(_measure_step_memory,
                                       (factory, batch, resolution, num_classes, device, 0), int(cap_gb * GIB))
        if status == "error":
            raise RuntimeError(result)
        return status == "ok"

    best = 0
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    where = "CUDA OOM" if device.startswith("cuda") else f"CPU memory budget {cap_gb:g} GiB (not comparable to GPU)"
    return Measurement("max_batch_size", best or None, "images", f"binary search, one training step, {where}")


# ---- params, MACs, inference -----------------------------------------------------------------------------------------

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-adds of one forward at batch 1 (the papers' "FLOPs"), counted on whatever device ``model`` is on
    (the meta device costs nothing)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, resolution, resolution, device=device)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def probe_params_macs(factory: ModelFactory, deploy: Callable[[nn.Module], nn.Module],
                      resolution: int = 224) -> list[Measurement]:
    with torch.device("meta"):
        model = factory()
    out = [Measurement("params_train", count_params(model), "params", "numel of all parameters, training form"),
           Measurement("macs_train", count_macs(model, resolution), "MACs",
                       f"torch FlopCounterMode / 2, batch 1, {resolution}x{resolution}, training form (eval mode, "
                       "kernel composition included)")]
    deploy(model)
    out += [Measurement("params_deploy", count_params(model), "params", "numel of all parameters, deployed form"),
            Measurement("macs_deploy", count_macs(model, resolution), "MACs",
                        f"torch FlopCounterMode / 2, batch 1, {resolution}x{resolution}, deployed form")]
    return out


def probe_inference(model: nn.Module, resolution: int, device: str = "cpu", latency_batch: int = 1,
                    throughput_batch: int = 128, warmup: int = 2, steps: int = 5) -> list[Measurement]:
    """Latency (median, batch ``latency_batch``) and throughput (images/s at ``throughput_batch``) of a model in
    eval mode under ``torch.inference_mode`` (pass the deployed model)."""
    model.to(device).eval()
    results = []
    for batch, name in ((latency_batch, "latency"), (throughput_batch, "throughput")):
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            synchronize(device)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                model(x)
                synchronize(device)
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        if name == "latency":
            results.append(Measurement("latency", median, "s", f"median of {steps} forwards at batch {batch} after "
                                       f"{warmup} warm-up, deployed model, {torch.get_num_threads()} threads"))
        else:
            results.append(Measurement("throughput", batch / median, "img/s",
                                       f"batch {batch} / median forward time of {steps}, deployed model"))
    return results
