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

import copy
import ctypes
import functools
import itertools
import multiprocessing as mp
import os
import pickle
import re
import resource
import signal
import statistics
import threading
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

from .launch import pid_alive

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
    batch: int | None = None        # the conditions it was measured under, stored with it
    resolution: int | None = None
    threads: int | None = None
    samples: list[float] = field(default_factory=list, repr=False)  # per-step times, for ratios (not stored)


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
    """A closure doing one forward + backward + SGD (momentum) step on a fixed random batch. A RepOpt target
    (RepOptimizers) steps with its RepOptimizer: the Grad Mults are part of its training cost."""
    from backbones.repopt import build_repoptimizer, target_blocks
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    model.to(device).train()
    settings = dict(lr=lr, momentum=0.9, weight_decay=1e-4)
    optimizer = (build_repoptimizer("sgd", model, **settings) if target_blocks(model)
                 else torch.optim.SGD(model.parameters(), **settings))

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


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _interleaved(calls: dict[str, Callable[[], object]], device: str, warmup: int, steps: int) -> dict[str, list]:
    """Each call's time, ``steps`` times in turn (A, B, A, B, ...) after ``warmup`` rounds, so that drift of the
    machine (clock, thermal, other load) hits every model alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def probe_train_time_interleaved(models: dict[str, nn.Module], batch: int, resolution: int, num_classes: int,
                                 device: str = "cpu", warmup: int = 2, steps: int = 5) -> dict[str, Measurement]:
    """Time several models step by step in turn; their per-step times (``samples``) pair up for ratios."""
    train_steps = {name: make_train_step(m, batch, resolution, num_classes, device) for name, m in models.items()}
    times = _interleaved(train_steps, device, warmup, steps)
    how = (f"median of {steps} timed fwd+bwd+SGD steps after {warmup} warm-up, synchronised, fixed batch, "
           f"{torch.get_num_threads()} threads" + (f", interleaved with {len(models) - 1} other model(s)"
                                                   if len(models) > 1 else ""))
    results = {}
    for name, ts in times.items():
        q1, median, q3 = _quartiles(ts)
        results[name] = Measurement("time_per_batch", median, "s", how, extra={"time_per_batch_iqr": q3 - q1},
                                    batch=batch, resolution=resolution, threads=torch.get_num_threads(),
                                    samples=ts)
    return results


def _time_alone(factory: "ModelFactory", batch: int, resolution: int, num_classes: int, device: str, warmup: int,
                steps: int) -> list[float]:
    return _interleaved({"model": _classification_step(factory, batch, resolution, num_classes, device)}, device,
                        warmup, steps)["model"]


def probe_train_time_isolated(factory: "ModelFactory", batch: int, resolution: int, num_classes: int,
                              device: str = "cpu", warmup: int = 2, steps: int = 5, cap_gb: float = 16.0
                              ) -> Measurement:
    """One model's training step timed alone, as its own training script would run it: on CPU in a fresh child of
    the clean fork server (all threads, under the memory cap), so that no other model's memory or allocator history
    shares the process. Models timed this way are compared by :func:`ratio_of_medians`, not per step."""
    if device.startswith("cuda"):
        return probe_train_time(factory(), batch, resolution, num_classes, device, warmup, steps)
    status, times, _, threads = run_capped(_time_alone, (factory, batch, resolution, num_classes, device, warmup,
                                                         steps), int(cap_gb * GIB))
    if status != "ok":
        raise RuntimeError(f"isolated timing child: {status}: {times}")
    q1, median, q3 = _quartiles(times)
    return Measurement("time_per_batch", median, "s", f"median of {steps} timed fwd+bwd+SGD steps after {warmup} "
                       f"warm-up, fixed batch, {threads} threads, alone in a fresh child process",
                       extra={"time_per_batch_iqr": q3 - q1, "time_per_batch_q1": q1, "time_per_batch_q3": q3},
                       batch=batch, resolution=resolution, threads=threads, samples=times)


def ratio_of_medians(name: str, mine: Measurement, base: Measurement, baseline: str) -> Measurement:
    """The ratio of two models timed each alone (:func:`probe_train_time_isolated`): median over median, with the
    widest interval the two interquartile ranges allow (q1 / q3 .. q3 / q1)."""
    m, b = mine.extra, base.extra
    return Measurement(name, mine.value / base.value, "x", f"ratio of medians to {baseline}, each timed alone in its "
                       "own process; interval from the two interquartile ranges stored beside it",
                       extra={f"{name}_q1": m["time_per_batch_q1"] / b["time_per_batch_q3"],
                              f"{name}_q3": m["time_per_batch_q3"] / b["time_per_batch_q1"]},
                       batch=mine.batch, resolution=mine.resolution, threads=mine.threads)


def paired_ratio(name: str, mine: Measurement, base: Measurement, baseline: str, invert: bool = False
                 ) -> Measurement:
    """The ratio of two models timed interleaved: the median of the per-step ratios (``invert``: base / mine, for a
    rate such as throughput) with their interquartile interval (``extra``: ``<name>_q1``, ``<name>_q3``)."""
    pairs = [(b / m if invert else m / b) for m, b in zip(mine.samples, base.samples) if m > 0 and b > 0]
    q1, median, q3 = _quartiles(pairs)
    return Measurement(name, median, "x", f"median of {len(pairs)} per-step ratios to {baseline}, timed interleaved "
                       "in the same process; interquartile interval stored beside it",
                       extra={f"{name}_q1": q1, f"{name}_q3": q3}, batch=mine.batch, resolution=mine.resolution,
                       threads=mine.threads)


# ---- memory ---------------------------------------------------------------------------------------------------------

def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_free_memory() -> None:
    """Give the allocator's cached free pages back to the kernel, so that RSS is live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _reusable_address_space() -> int:
    """Bytes this process may use without growing its address space: the allocator's free heap (``mallinfo2``) and
    anonymous reserved regions (``---p``: glibc arenas grow into them by mprotect). RLIMIT_AS does not cap these: a
    child forked from a process that worked before inherits them."""
    _release_free_memory()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        free = libc.mallinfo2().fordblks
    except (OSError, AttributeError):  # no glibc >= 2.33
        free = 0
    reserved = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1] == "---p" and len(fields) == 5:  # no path: anonymous
                low, high = (int(x, 16) for x in fields[0].split("-"))
                reserved += high - low
    return free + reserved


def _reset_peak_rss() -> None:
    # RSS is then the live memory (weights, gradients, optimizer state), and the measured step's growth is its
    # activations, not what malloc kept from the warm-up.
    _release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


_PROBE_CGROUP = re.compile(r"repbench-probe-(\d+)-\d+")
LEAF = "repbench-procs"  # cgroup v2: where the processes of a cgroup go so that it may delegate memory to probes


def memory_cgroup_of(proc_cgroup: str, mountinfo: str) -> tuple[Path, str] | tuple[None, str]:
    """A process's memory cgroup as a directory, and ``v1`` or ``v2`` (or None and why not), from the texts of its
    /proc/PID/cgroup and /proc/PID/mountinfo, so that cgroup namespaces and bind-mounted subtrees resolve. Where a
    v1 memory controller is mounted (hybrid hosts too) it is the one that limits memory."""
    memberships = [line.split(":", 2) for line in proc_cgroup.splitlines() if line.count(":") >= 2]
    mounts = [line.split() for line in mountinfo.splitlines() if " - " in line]

    def mount_of(fstype: str, option: str | None):
        for fields in mounts:
            sep = fields.index("-")
            if fields[sep + 1] == fstype and (option is None or option in fields[sep + 3].split(",")):
                return Path(fields[4]), fields[3]
        return None, None

    v1 = [path for _, controllers, path in memberships if "memory" in controllers.split(",")]
    v2 = [path for hierarchy, controllers, path in memberships if hierarchy == "0" and controllers == ""]
    if v1:
        version, path, (mount, root) = "v1", v1[0], mount_of("cgroup", "memory")
    elif v2:
        version, path, (mount, root) = "v2", v2[0], mount_of("cgroup2", None)
    else:
        return None, "this process is in no memory cgroup"
    if mount is None:
        return None, f"no cgroup {version} memory hierarchy mounted"
    relative = os.path.relpath(path, root)
    if relative.startswith(".."):
        return None, f"own cgroup {path} is outside the mounted subtree {root}"
    own = Path(os.path.normpath(mount / relative))
    if version == "v2" and own.name == LEAF:  # moved there by an earlier probe: the cgroup that delegates is above
        own = own.parent
    return own, version


@functools.cache
def _cgroup_home() -> tuple[Path | None, str]:
    """The directory under which this process makes its probe cgroups, once per process: inside its own memory
    cgroup, so that a probe stays under its container's or Slurm job's limit. cgroup v2 lets a cgroup delegate
    memory to children only when it holds no process itself (the no-internal-process rule): its processes move into
    a leaf child first (``repbench-procs``; the limits above them are unchanged). Leftover cgroups of killed probes
    are removed here. Returns (None, why) where that is not permitted: the caller falls back to RLIMIT_AS."""
    try:
        own, version = memory_cgroup_of(Path("/proc/self/cgroup").read_text(),
                                        Path("/proc/self/mountinfo").read_text())
    except OSError as e:
        return None, f"cannot read /proc/self/cgroup ({e.strerror})"
    if own is None:
        return None, version
    try:
        if version == "v2":
            enabled = (own / "cgroup.subtree_control").read_text().split()
            if "memory" not in enabled:
                if "memory" not in (own / "cgroup.controllers").read_text().split():
                    return None, f"the memory controller is not delegated to {own}"
                leaf = own / LEAF
                leaf.mkdir(exist_ok=True)
                for pid in (own / "cgroup.procs").read_text().split():
                    try:
                        (leaf / "cgroup.procs").write_text(pid)
                    except ProcessLookupError:
                        pass
                (own / "cgroup.subtree_control").write_text("+memory")
        elif not (own / "memory.limit_in_bytes").exists():
            return None, f"{own} has no memory.limit_in_bytes"
    except OSError as e:
        return None, f"cannot delegate memory below {own} ({e.strerror or e})"
    for stale in own.glob("repbench-probe-*"):
        match = _PROBE_CGROUP.fullmatch(stale.name)
        if match and not pid_alive(int(match.group(1))):
            try:
                stale.rmdir()
            except OSError:
                pass
    return own, version


def memory_cap_mode() -> str:
    """``$REPBENCH_MEMORY_CAP``: ``auto`` (default: a cgroup where permitted, else RLIMIT_AS) or ``rlimit``."""
    mode = os.environ.get("REPBENCH_MEMORY_CAP", "auto")
    if mode not in ("auto", "rlimit"):
        raise ValueError(f"REPBENCH_MEMORY_CAP must be auto or rlimit, not {mode!r}")
    return mode


_probe_count = itertools.count()


@contextmanager
def memory_cgroup(cap_bytes: int):
    """A fresh memory cgroup limited to ``cap_bytes`` inside this process's own (see :func:`_cgroup_home`), yielded
    as (path, None), or (None, why not)."""
    home, why = _cgroup_home() if memory_cap_mode() == "auto" else (None, "REPBENCH_MEMORY_CAP=rlimit")
    if home is None:
        yield None, why
        return
    limit_file = "memory.max" if why == "v2" else "memory.limit_in_bytes"
    path = home / f"repbench-probe-{os.getpid()}-{next(_probe_count)}"
    try:
        path.mkdir()
        (path / limit_file).write_text(str(cap_bytes))
    except OSError as e:
        if path.exists():
            path.rmdir()
        yield None, f"cannot make a cgroup in {home} ({e.strerror or e})"
        return
    try:
        yield path, None
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _die_with_parent() -> None:
    """For a forked helper (the clean fork server, a memory child): die with the parent, and drop the handlers
    inherited from it. Slurm signals every process of a step: a handler of the parent's (submitit's SIGUSR2 handler
    requeues the job; training's checkpoints) must not run in a helper. The parent decides when probing stops."""
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass


_ALLOCATION_FAILED = ("can't allocate memory", "DefaultCPUAllocator", "std::bad_alloc", "Cannot allocate memory",
                      "could not create a primitive")  # oneDNN's words for a failed allocation


READY_TIMEOUT_S = 10.0  # a child whose first parallel op has not returned by then is stuck in a broken OpenMP pool
_threads_safe = True  # False once a child of this process hung in OpenMP: later children use one thread


def _capped_child(conn, cgroup: Path | None, cap_bytes: int, threads: int, fn, args):
    _die_with_parent()
    torch.set_num_threads(threads)
    if threads > 1:  # the parent waits for this: a fork of a process that ran OpenMP work hangs right here
        torch.ones(1 << 20).sum()
        conn.send(("ready", None))
    if cgroup is not None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    else:
        limit = _status_kib("VmSize") * 1024 + max(cap_bytes - _reusable_address_space(), 0)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(("ok", fn(*args)))
    except MemoryError:
        conn.send(("oom", None))
    except RuntimeError as e:  # under RLIMIT_AS, torch's allocator and oneDNN raise these rather than MemoryError
        conn.send(("oom", None) if cgroup is None and any(s in str(e) for s in _ALLOCATION_FAILED) else
                  ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _run_capped_here(fn, args: tuple, cap_bytes: int, threads: int) -> tuple[str, object, str, int]:
    global _threads_safe
    import torch._dynamo  # noqa: F401 - what an optimizer imports at creation: here, not under the child's cap
    threads = threads if _threads_safe else 1
    with memory_cgroup(cap_bytes) as (cgroup, why_not):
        method = f"cgroup memory limit {cap_bytes / GIB:.1f} GiB" if cgroup else (
            f"RLIMIT_AS = virtual size + {cap_bytes / GIB:.1f} GiB less the free heap and reserved regions inherited "
            f"({why_not})")
        receive, send = mp.Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            try:
                receive.close()
                _capped_child(send, cgroup, cap_bytes, threads, fn, args)
            finally:
                os._exit(0)
        send.close()
        stuck = threads > 1 and not receive.poll(READY_TIMEOUT_S)
        if stuck:
            os.kill(pid, signal.SIGKILL)
        try:
            if threads > 1 and not stuck:
                receive.recv()  # "ready" (or EOF: the child died before; reported below)
            status, result = receive.recv()
        except EOFError:
            status, result = None, None
        receive.close()
        exitcode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if stuck:  # this process had run OpenMP work before it forked: from now on its children use one thread
        _threads_safe = False
        return _run_capped_here(fn, args, cap_bytes, 1)
    if status is None:
        if exitcode in (-9, 137):
            return "oom", None, method, threads
        if exitcode == -signal.SIGSEGV and not cgroup:
            # under RLIMIT_AS an allocation that native code does not check (a thread's stack, an OpenMP buffer)
            # fails as a segfault rather than a MemoryError: the cap was reached
            return "oom", None, method + "; the child crashed (SIGSEGV) at the limit", threads
        return "error", f"memory probe child exited with code {exitcode}", method, threads
    return status, result, method, threads


class CleanForkServer:
    """A process forked before this one ran any parallel torch op, which forks the memory probes' children.

    libgomp's thread pool does not survive fork: a child of a process that already ran OpenMP work hangs in its first
    parallel op unless it uses one thread (as DataLoader workers do). Children of this server may use as many threads
    as the timing probes do, so that memory is measured at the same thread count. Start it first thing in a fresh
    process (:func:`start_clean_fork_server`); elsewhere probes fork directly and use one thread."""

    def __init__(self):
        self._conn, theirs = mp.Pipe()
        self._lock = threading.Lock()
        self.owner = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self._conn.close()
                self._serve(theirs)
            finally:
                os._exit(0)
        theirs.close()

    @staticmethod
    def _serve(conn) -> None:
        _die_with_parent()
        while True:
            try:
                request = conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                fn, args, cap_bytes, threads = pickle.loads(request)  # fn: importable where the server was forked
                conn.send(_run_capped_here(fn, args, cap_bytes, threads))
            except BaseException as e:  # noqa: BLE001 - e.g. a cgroup error: reported like a child's error
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", "", 0))

    def run(self, fn, args: tuple, cap_bytes: int, threads: int):
        with self._lock:
            self._conn.send((fn, args, cap_bytes, threads))
            return self._conn.recv()


_SERVER: CleanForkServer | None = None


def start_clean_fork_server() -> None:
    """Start this process's :class:`CleanForkServer`. Call it first thing in a fresh process (a job's worker, the cost
    benchmark), before any torch op: importing torch and setting the thread count are fine, a parallel op is not."""
    global _SERVER
    if _SERVER is None or _SERVER.owner != os.getpid():
        _SERVER = CleanForkServer()


def clean_fork_server_running() -> bool:
    """Whether this process's memory probes fork from its :class:`CleanForkServer`."""
    return _SERVER is not None and _SERVER.owner == os.getpid()


def run_capped(fn, args: tuple, cap_bytes: int, threads: int | None = None) -> tuple[str, object, str, int]:
    """Run ``fn(*args)`` in a fresh child process under a memory cap. Returns (status, result, cap method, threads the
    child used) with status ``ok``, ``oom`` (killed by the cgroup, or an allocation failure under RLIMIT_AS) or
    ``error``. The child uses ``threads`` (default: this process's count) when it is forked by this process's clean
    fork server, else one thread. Should the server not be clean after all (started after parallel work), its
    children's first parallel op hangs: it is killed after READY_TIMEOUT_S and the probe runs with one thread."""
    threads = threads or torch.get_num_threads()
    if clean_fork_server_running():
        return _SERVER.run(fn, args, cap_bytes, threads)
    return _run_capped_here(fn, args, cap_bytes, 1)


def _classification_step(factory: ModelFactory, batch: int, resolution: int, num_classes: int, device: str):
    """The training step the classification probes measure (``make_train_step``) of a freshly built model."""
    return make_train_step(factory(), batch, resolution, num_classes, device)


def _measure_step_memory(make_step: Callable[[], Callable[[], object]], device: str, warmup: int):
    """(peak, growth during the measured step) in bytes of the step ``make_step()`` builds (see the module
    docstring); on CPU run in a fresh child (``run_capped``)."""
    if device.startswith("cuda"):
        step = make_step()
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
    step = make_step()
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
    the measured step alone. On CPU ``threads`` is the count the child process really used."""
    return probe_step_memory(functools.partial(_classification_step, factory, batch, resolution, num_classes,
                                               device), device, warmup, cap_gb, batch=batch, resolution=resolution)


def probe_step_memory(make_step: Callable[[], Callable[[], object]], device: str = "cpu", warmup: int = 1,
                      cap_gb: float = 16.0, what: str = "", **where) -> Measurement:
    """Peak training memory in GiB of any training step: ``make_step()`` builds the model, its optimizer and a fixed
    batch and returns the step (a picklable callable: on CPU it runs in a capped child). The classification probe
    and the dense runner's (an mmdet / mmseg ``train_step``) are this one; ``what`` names the step in the method;
    ``where`` (batch, resolution) is stored with the value."""
    cap = int(cap_gb * GIB)
    if device.startswith("cuda"):
        method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats" + what
        try:
            peak, step = _measure_step_memory(make_step, device, warmup)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return Measurement("train_memory", None, "GiB", f"CUDA OOM; {method}", oom=True, **where)
        return Measurement("train_memory", peak / GIB, "GiB", method, extra={"train_memory_step": step / GIB},
                           threads=torch.get_num_threads(), **where)
    status, result, cap_method, threads = run_capped(_measure_step_memory, (make_step, device, warmup), cap)
    method = (f"CPU child process ({threads} thread(s)): VmHWM (reset via /proc/self/clear_refs before the step "
              f"after {warmup} warm-up) minus RSS at the child's start, before the model is built{what}; "
              f"{cap_method}")
    if status == "oom":
        return Measurement("train_memory", None, "GiB", f"OOM at budget {cap_gb:g} GiB; {method}", oom=True,
                           threads=threads, **where)
    if status == "error":
        raise RuntimeError(result)
    peak, step = result
    if peak > cap:  # a child may reuse inherited free heap that neither limit sees: its peak still decides
        return Measurement("train_memory", None, "GiB", f"OOM at budget {cap_gb:g} GiB (peak {peak / GIB:.2f} GiB "
                           f"measured over it); {method}", oom=True, threads=threads, **where)
    return Measurement("train_memory", peak / GIB, "GiB", method, extra={"train_memory_step": step / GIB},
                       threads=threads, **where)


def probe_max_batch_size(factory: ModelFactory, resolution: int, num_classes: int, device: str = "cpu",
                         cap_gb: float = 16.0, start: int = 1, high: int = 4096) -> Measurement:
    """The largest batch that trains one step without OOM (RepOptimizers Table 2's "Train MaxBS"; CPU: under
    ``cap_gb``, not comparable with the papers' GPU numbers), exact, by a bounded search: doubling from ``start``
    (a batch expected to fit, e.g. the cost batch) until a batch does not fit or ``high`` is reached, then bisection
    between the last that fit and the first that did not. Each try is one step in a fresh capped child."""
    tries: list[str] = []

    def fits(batch: int) -> bool:
        ok = not probe_train_memory(factory, batch, resolution, num_classes, device, 0, cap_gb).oom
        tries.append(f"{batch}{'' if ok else ' OOM'}")
        return ok

    best, bad = 0, high + 1
    batch = max(1, min(start, high))
    while batch <= high:  # gallop
        if not fits(batch):
            bad = batch
            break
        best, batch = batch, batch * 2
    if best == 0:  # even ``start`` did not fit: search below it
        bad = min(bad, max(1, min(start, high)))
    low = best + 1
    high = min(high, bad - 1)
    while low <= high:  # bisect (best fits, bad does not)
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    where = "CUDA OOM" if device.startswith("cuda") else f"CPU memory budget {cap_gb:g} GiB (not comparable to GPU)"
    return Measurement("max_batch_size", best or None, "images", f"largest batch training one step, {where}; "
                       f"tried {', '.join(tries)}", oom=best == 0, resolution=resolution)


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


def _on_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors live on the meta device (shapes only), for counting MACs without compute."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def params_macs(model: nn.Module, form: str, resolution: int = 224) -> list[Measurement]:
    """Parameters and MACs of ``model`` in its ``form`` (train or deploy); MACs counted on a meta-device copy."""
    how = "training form (eval mode, kernel composition included)" if form == "train" else "deployed form"
    return [Measurement(f"params_{form}", count_params(model), "params", f"numel of all parameters, {form} form"),
            Measurement(f"macs_{form}", count_macs(_on_meta(model), resolution), "MACs",
                        f"torch FlopCounterMode / 2, batch 1, {resolution}x{resolution}, {how}",
                        batch=1, resolution=resolution)]


def probe_params_macs(factory: ModelFactory, deploy: Callable[[nn.Module], nn.Module],
                      resolution: int = 224) -> list[Measurement]:
    """Params and MACs of the training and the deployed form of a model built (and deployed) on the meta device."""
    with torch.device("meta"):
        model = factory()
        out = params_macs(model, "train", resolution)
        return out + params_macs(deploy(model), "deploy", resolution)


def probe_inference(model: nn.Module, resolution: int, device: str = "cpu", latency_batch: int = 1,
                    throughput_batch: int = 128, warmup: int = 2, steps: int = 5) -> list[Measurement]:
    return probe_inference_interleaved({"model": model}, resolution, device, latency_batch, throughput_batch,
                                       warmup, steps)["model"]


def probe_inference_interleaved(models: dict[str, nn.Module], resolution: int, device: str = "cpu",
                                latency_batch: int = 1, throughput_batch: int | None = 128, warmup: int = 2,
                                steps: int = 5) -> dict[str, list[Measurement]]:
    """Latency (median forward time at ``latency_batch``) and throughput (images/s at ``throughput_batch``; None:
    latency only) of models in eval mode under ``torch.inference_mode``, forwards interleaved between the models
    (pass deployed models)."""
    threads = torch.get_num_threads()
    results: dict[str, list[Measurement]] = {name: [] for name in models}
    for model in models.values():
        model.to(device).eval()
    for batch, name in ((latency_batch, "latency"), (throughput_batch, "throughput")):
        if batch is None:
            continue
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        with torch.inference_mode():
            times = _interleaved({key: functools.partial(model, x) for key, model in models.items()}, device,
                                 warmup, steps)
        others = f", interleaved with {len(models) - 1} other model(s)" if len(models) > 1 else ""
        for key, ts in times.items():
            median = statistics.median(ts)
            if name == "latency":  # with the spread of the forwards (RepNeXt Table 5's "±": their std)
                m = Measurement("latency", median, "s", f"median of {steps} forwards at batch {batch} after "
                                f"{warmup} warm-up, deployed model, {threads} threads{others}",
                                extra={"latency_std": statistics.stdev(ts) if len(ts) > 1 else 0.0})
            else:
                m = Measurement("throughput", batch / median, "img/s", f"batch {batch} / median forward time of "
                                f"{steps} after {warmup} warm-up, deployed model, {threads} threads{others}")
            m.batch, m.resolution, m.threads, m.samples = batch, resolution, threads, ts
            results[key].append(m)
    return results


# ---- a row against its baseline, in one process ----------------------------------------------------------------------

@dataclass(frozen=True)
class CostSetting:
    """Where and how a cost comparison measures: the probes' batch, resolution, steps and memory budget."""

    batch: int
    resolution: int
    num_classes: int
    device: str = "cpu"
    warmup: int = 2
    steps: int = 5
    cap_gb: float = 16.0
    latency_batch: int = 1
    throughput_batch: int = 128
    macs_resolution: int = 224
    max_batch_cap_gb: float | None = None  # the MaxBS search's budget (None: ``cap_gb``) and upper bound
    max_batch_high: int = 4096


RATIOS = {"train_memory": "train_memory_ratio", "time_per_batch": "time_per_batch_ratio",
          "latency": "latency_ratio", "throughput": "throughput_ratio", "train_speed": "train_speed_ratio",
          "max_batch_size": "max_batch_size_ratio"}
FORMS = {"train": None, "srep": {"shortcut": True}, "linear": {"pointwise_as_linear": True}}  # RepNeXt's forms
# a form's inference (compare_costs' ``forms``) is compared with the baseline's same form, or its deployed one
FORM_METRICS = {f"{m}_{f}": m for m in ("latency", "throughput") for f in FORMS}
RATIOS.update({name: f"{name}_ratio" for name in FORM_METRICS})
SINGLE = ("train_memory", "max_batch_size")  # one reading per model: a plain quotient, no interquartile interval
RATES = ("throughput", "train_speed")  # higher is better: their ratio is the baseline's time / the row's


def in_form(model: nn.Module, form: str, deploy: Callable[..., nn.Module]) -> nn.Module:
    """``model`` in ``form``: ``deploy`` (the regular deploy) or a FORMS key (``train``: as it is)."""
    if form == "deploy":
        return deploy(model)
    return model if FORMS[form] is None else deploy(model, **FORMS[form])


def on_cpu(name: str) -> str:
    """A latency / throughput metric's name in a table's CPU columns (RepNeXt Table 6): ``latency_ratio`` ->
    ``latency_cpu_ratio``; other names unchanged."""
    return re.sub(r"^(latency|throughput)(?!_cpu)", r"\1_cpu", name)


def train_speed(timed: Measurement) -> Measurement:
    """Images per second of training (RepOptimizers Table 2's "train speed"): the timed steps' batch / their median
    time, from the same interleaved steps as ``time_per_batch`` (``samples`` stay per-step times, for ratios)."""
    return Measurement("train_speed", None if not timed.value else timed.batch / timed.value, "samples/s",
                       f"batch {timed.batch} / median step time; {timed.method}", oom=timed.oom, batch=timed.batch,
                       resolution=timed.resolution, threads=timed.threads, samples=timed.samples)


def _ratio_one(m: Measurement, baseline: str) -> Measurement:
    """The baseline's own ratio, 1, with the same keys as a compared row's (memory is one reading: no interval)."""
    spread = {} if m.name in SINGLE else {f"{RATIOS[m.name]}_q1": 1.0, f"{RATIOS[m.name]}_q3": 1.0}
    return Measurement(RATIOS[m.name], 1.0, "x", f"the group's baseline ({baseline}): 1 by definition",
                       extra=spread, batch=m.batch, resolution=m.resolution, threads=m.threads)


def compare_costs(factories: dict[str, ModelFactory], baseline: str | None, setting: CostSetting,
                  deploy: Callable[..., nn.Module], probes: tuple[str, ...] = ("train_memory",
                  "time_per_batch", "params_macs", "inference"),
                  on_built: Callable[[str, nn.Module], None] | None = None,
                  log: Callable[[str], None] | None = None,
                  forms: dict[str, tuple[str, ...]] | None = None, deployed: dict[str, str] | None = None
                  ) -> tuple[dict[str, list[Measurement]], "Load"]:
    """Measure every model of ``factories`` with the same probes in this process and each one's ratio to
    ``baseline`` (one of the names, or None): memory in fresh capped children one after the other, training steps
    interleaved, params/MACs of both forms (not of a baseline compared against others: its own run has them), then the
    deployed models' forwards interleaved. Each model is built once
    in this process (``on_built(name, model)`` sees it before any probe touches it), timed, then deployed in place.

    ``forms``: per name, other forms of that model measured beside its deployed one (FORMS: ``train`` the training
    form, ``srep`` / ``linear`` RepNeXt's shortcut-re-parameterized and Linear-pointwise deploys): their inference
    interleaved with the rest, stored as ``latency_<form>`` / ``throughput_<form>``, and ``params_srep`` /
    ``macs_srep``. ``deployed``: per name, the form its deployed metrics measure instead of ``deploy(model)`` (a
    FORMS key; RepNeXt Table 6's rows are the train, rRep and sRep forms of one model).

    Returns the measurements per name (ratios included; the baseline's ratios are 1) and the machine's load while
    timing (:class:`Load`). A model whose memory probe hit the budget is not timed (it would not fit here either).
    """
    s, log = setting, log or (lambda line: None)
    out: dict[str, list[Measurement]] = {name: [] for name in factories}
    counted = {name for name in factories if "params_macs" in probes and (name != baseline or len(factories) == 1)}
    memory: dict[str, Measurement] = {}
    if "train_memory" in probes:
        for name, factory in factories.items():  # first: this process has built nothing yet
            log(f"memory probe of {name}")
            memory[name] = probe_train_memory(factory, s.batch, s.resolution, s.num_classes, s.device, s.warmup,
                                              s.cap_gb)
            out[name].append(memory[name])
    if "max_batch_size" in probes:
        for name, factory in factories.items():
            log(f"MaxBS search of {name}")
            out[name].append(probe_max_batch_size(factory, s.resolution, s.num_classes, s.device,
                                                  s.max_batch_cap_gb or s.cap_gb, s.batch, s.max_batch_high))
    models = {}
    for name, factory in factories.items():
        models[name] = factory()
        if on_built:
            on_built(name, models[name])
        if name in counted:
            out[name] += params_macs(models[name], "train", s.macs_resolution)
    fitting = {name: m for name, m in models.items() if not (name in memory and memory[name].oom)}
    load = Load.start()
    timed: dict[str, Measurement] = {}
    if "time_per_batch" in probes:
        if fitting:
            log(f"timing {', '.join(fitting)} interleaved")
            timed = probe_train_time_interleaved(fitting, s.batch, s.resolution, s.num_classes, s.device, s.warmup,
                                                 s.steps)
        for name in models:
            out[name].append(timed.get(name) or Measurement(
                "time_per_batch", None, "s", f"not timed: {memory[name].method.split(';')[0]}", oom=True,
                batch=s.batch, resolution=s.resolution))
            if "train_speed" in probes:
                out[name].append(train_speed(out[name][-1]))
    inference: dict[str, list[Measurement]] = {}
    if "params_macs" in probes or "inference" in probes:
        variants = {}  # (name, form) -> that form of the model
        for name, wanted_forms in (forms or {}).items():
            for form in wanted_forms:
                variants[name, form] = in_form(copy.deepcopy(models[name]), form, deploy)
                if form == "srep" and name in counted:
                    out[name] += params_macs(variants[name, form], "srep", s.macs_resolution)
        for name, model in models.items():
            models[name] = in_form(model, (deployed or {}).get(name, "deploy"), deploy)
            if name in counted:  # a baseline compared against others has its own run for these
                out[name] += params_macs(models[name], "deploy", s.macs_resolution)
        if "inference" in probes:
            every = {**models, **{f"{name} ({form})": m for (name, form), m in variants.items()}}
            log(f"inference of {', '.join(every)} interleaved")
            inference = probe_inference_interleaved(every, s.resolution, s.device, s.latency_batch,
                                                    s.throughput_batch, s.warmup, s.steps)
            for name in models:
                out[name] += inference[name]
            for (name, form), _ in variants.items():
                for m in inference[f"{name} ({form})"]:
                    m.method = m.method.replace("deployed model", f"{form} form")
                    m.extra = {k.replace(m.name, f"{m.name}_{form}", 1): v for k, v in m.extra.items()}
                    m.name = f"{m.name}_{form}"
                    out[name].append(m)
    load.stop()
    if baseline is not None:
        for name in factories:
            base = {m.name: m for m in out[baseline]}
            for m in list(out[name]):
                ref = base.get(m.name) or base.get(FORM_METRICS.get(m.name, ""))
                if m.name not in RATIOS or m.value is None or ref is None or ref.value is None:
                    continue
                if name == baseline:
                    out[name].append(_ratio_one(m, baseline))
                elif m.name in SINGLE:
                    out[name].append(Measurement(RATIOS[m.name], m.value / ref.value, "x",
                                                 f"{m.name} / that of {baseline}, both measured in fresh children "
                                                 "one after the other", batch=m.batch, resolution=m.resolution,
                                                 threads=m.threads))
                else:
                    out[name].append(paired_ratio(RATIOS[m.name], m, ref, baseline,
                                                  invert=FORM_METRICS.get(m.name, m.name) in RATES))
    return out, load


# ---- the machine's load while timing ----------------------------------------------------------------------------------

BUSY_SHARE = 0.25  # other processes' share of the machine's CPUs above which a timing is flagged as disturbed


def _busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Load:
    """The machine's load around a timing: 1-minute load average before and after, and the share of the machine's
    CPU time that other processes used meanwhile (busy CPU time of the machine minus this process's)."""

    load_before: float = 0.0
    load_after: float = 0.0
    other_share: float | None = None
    _t0: tuple = ()

    @classmethod
    def start(cls) -> "Load":
        return cls(load_before=os.getloadavg()[0], _t0=(time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds()))

    def stop(self) -> None:
        t0, busy0, own0 = self._t0
        elapsed = time.monotonic() - t0
        self.load_after = os.getloadavg()[0]
        if elapsed > 0:
            others = (_busy_cpu_seconds() - busy0) - (_own_cpu_seconds() - own0)
            self.other_share = min(1.0, max(0.0, others / (elapsed * (os.cpu_count() or 1))))

    @property
    def busy(self) -> bool:
        return self.other_share is not None and self.other_share > BUSY_SHARE

    def describe(self) -> str:
        share = "unknown" if self.other_share is None else f"{100 * self.other_share:.0f}%"
        return (f"other processes used {share} of the machine's {os.cpu_count()} CPUs while timing; load average "
                f"{self.load_before:.2f} before, {self.load_after:.2f} after")

    def measurements(self) -> list[Measurement]:
        verdict = (f"BUSY (> {100 * BUSY_SHARE:.0f}%): absolute times are inflated; ratios to the baseline were "
                   "timed interleaved" if self.busy else "idle enough")
        how = f"{self.describe()}; {verdict}"
        return [Measurement("machine_load_before", self.load_before, "load", "1-minute load average (os.getloadavg) "
                            "before the timed probes"),
                Measurement("machine_load_after", self.load_after, "load", "1-minute load average after the timed "
                            "probes"),
                Measurement("other_cpu_share", self.other_share, "fraction", how),
                Measurement("machine_busy", float(self.busy), "flag", f"1 when other processes used more than "
                            f"{100 * BUSY_SHARE:.0f}% of the CPUs while timing; {how}")]
