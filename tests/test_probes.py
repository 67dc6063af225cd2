"""Probes on a tiny model return sane values with units; memory caps turn OOM into a result; NaN -> diverged."""

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import build_classifier, deploy
from runners import probes


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def test_train_time_probe():
    m = probes.probe_train_time(tiny(), batch=4, resolution=16, num_classes=4, warmup=1, steps=5)
    assert m.unit == "s" and 0 < m.value < 5
    assert m.extra["time_per_batch_iqr"] >= 0
    assert "median of 5" in m.method and "1 warm-up" in m.method


def test_train_memory_probe_grows_with_batch():
    small = probes.probe_train_memory(tiny, 2, 32, 4, cap_gb=4)
    large = probes.probe_train_memory(tiny, 256, 32, 4, cap_gb=4)
    assert small.unit == "GiB" and not small.oom and small.value > 0
    assert large.value > small.value  # activations of 256 images outweigh those of 2
    assert large.extra["train_memory_step"] > small.extra["train_memory_step"]
    assert "VmHWM" in small.method and ("cgroup" in small.method or "RLIMIT_AS" in small.method)


def test_oom_under_the_cap_is_a_result():
    m = probes.probe_train_memory(lambda: build_classifier("resnet18", "dbb", num_classes=10), 64, 224, 10,
                                  cap_gb=0.5)
    assert m.oom and m.value is None and "OOM at budget 0.5 GiB" in m.method


def test_max_batch_size_is_exact_and_bounded():
    """The search doubles from its start, then bisects to one batch; checked afresh, 10 % below it fits and 10 % above
    it does not (a margin for the memory readings' own jitter). A bound that fits is the answer."""
    m = probes.probe_max_batch_size(tiny, 64, 4, cap_gb=0.4, start=4, high=4096)
    assert m.unit == "images" and 8 < m.value < 4096 and "tried 4, 8" in m.method and " OOM" in m.method
    assert not probes.probe_train_memory(tiny, int(m.value * 0.9), 64, 4, cap_gb=0.4, warmup=0).oom
    assert probes.probe_train_memory(tiny, int(m.value * 1.1) + 1, 64, 4, cap_gb=0.4, warmup=0).oom
    capped = probes.probe_max_batch_size(tiny, 64, 4, cap_gb=0.4, start=2, high=3)
    assert capped.value == 3 and " OOM" not in capped.method


def test_params_and_macs_of_resnet18():
    results = {m.name: m for m in probes.probe_params_macs(lambda: build_classifier("resnet18", "orepa"), deploy)}
    assert results["params_deploy"].value == 11_684_712
    assert results["params_train"].value > results["params_deploy"].value
    # torchvision-layout ResNet-18 at 224: 1.81 GMACs (conv + fc multiply-adds)
    assert round(results["macs_deploy"].value / 1e9, 2) == 1.81
    assert results["macs_train"].value > results["macs_deploy"].value  # online kernel composition counted


def test_inference_probe():
    latency, throughput = probes.probe_inference(tiny(), 16, latency_batch=1, throughput_batch=8, steps=3)
    assert latency.unit == "s" and 0 < latency.value < 5
    assert throughput.unit == "img/s" and throughput.value > 0
    assert "batch 1" in latency.method and "batch 8" in throughput.method


def test_nan_loss_is_diverged(tmp_path):
    from runners.train import Diverged, train_classifier
    from suites import Recipe
    recipe = Recipe(dataset="synthetic", resolution=32, batch=2, epochs=1, max_iters=3, lr=1e30)
    with pytest.raises(Diverged) as info:
        train_classifier(build_classifier("resnet18", "orepa", num_classes=4, variant="no_post_norm"), recipe,
                         tmp_path)
    assert info.value.step >= 1 and not math.isfinite(info.value.loss)


# ---- a row against its baseline, in one process ----------------------------------------------------------------------

def heavy():
    """tiny() with the same conv applied four times: about four times the work per step."""
    class Heavy(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

        def forward(self, x):
            x = self.stem(x)
            for _ in range(4):
                x = torch.relu(self.conv(x))
            return self.head(x)
    return Heavy()


def test_paired_ratio_is_the_median_of_per_step_ratios():
    mine = probes.Measurement("time_per_batch", 0.0, "s", "", samples=[2.0, 3.0, 8.0, 4.0])
    base = probes.Measurement("time_per_batch", 0.0, "s", "", samples=[1.0, 1.0, 2.0, 4.0])
    r = probes.paired_ratio("time_per_batch_ratio", mine, base, "B")  # per-step ratios 2, 3, 4, 1
    assert r.value == pytest.approx(2.5) and r.unit == "x"
    assert r.extra == {"time_per_batch_ratio_q1": pytest.approx(1.75), "time_per_batch_ratio_q3": pytest.approx(3.25)}
    rate = probes.paired_ratio("throughput_ratio", mine, base, "B", invert=True)
    assert rate.value == pytest.approx((1 / 3 + 1 / 2) / 2)  # base / mine: 1/2, 1/3, 1/4, 1


def test_compare_costs_measures_both_models_in_one_process_and_their_ratios():
    built = []

    def counted(factory, name):
        def build():
            built.append(name)
            return factory()
        return build

    setting = probes.CostSetting(batch=4, resolution=32, num_classes=4, warmup=1, steps=5, cap_gb=4,
                                 throughput_batch=4, macs_resolution=32)
    results, load = probes.compare_costs({"heavy": counted(heavy, "heavy"), "tiny": counted(tiny, "tiny")}, "tiny",
                                         setting, deploy)
    heavy_m = {m.name: m for m in results["heavy"]}
    tiny_m = {m.name: m for m in results["tiny"]}
    assert built == ["heavy", "tiny"]  # each built once here (the memory children build their own)
    ratio = heavy_m["time_per_batch_ratio"]
    assert ratio.value > 1.5 and ratio.extra["time_per_batch_ratio_q1"] <= ratio.value \
        <= ratio.extra["time_per_batch_ratio_q3"]
    assert "interleaved" in heavy_m["time_per_batch"].method and "per-step ratios to tiny" in ratio.method
    assert heavy_m["train_memory_ratio"].value == pytest.approx(heavy_m["train_memory"].value
                                                                / tiny_m["train_memory"].value)
    assert {"latency_ratio", "throughput_ratio", "params_train", "macs_deploy"} <= set(heavy_m)
    assert tiny_m["time_per_batch_ratio"].value == 1.0 and tiny_m["latency_ratio"].value == 1.0
    assert "params_train" not in tiny_m  # a compared baseline's own run counts those
    ratio_keys = {name: {k for m in ms if m.name.endswith("_ratio") for k in (m.name, *m.extra)}
                  for name, ms in results.items()}
    assert ratio_keys["heavy"] == ratio_keys["tiny"]  # a baseline's own run stores the same ratio metrics as others
    assert heavy_m["macs_train"].value > 2 * probes.count_macs(tiny(), 32)
    assert load.other_share is not None and 0 <= load.other_share <= 1
    assert {m.name for m in load.measurements()} == {"machine_load_before", "machine_load_after", "other_cpu_share",
                                                     "machine_busy"}


def test_load_sees_other_processes():
    """Busy loops on every CPU while the load is watched: their CPU time is counted as the machine's, not ours."""
    import subprocess
    import sys
    import time

    hogs = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
            for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        load = probes.Load.start()
        time.sleep(1.5)
        load.stop()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert load.other_share > probes.BUSY_SHARE and load.busy
    assert {m.name: m.value for m in load.measurements()}["machine_busy"] == 1.0


# ---- memory caps -------------------------------------------------------------------------------------------------------

V1_HYBRID = ("4:memory:/process_api/abc\n1:cpu:/\n0::/\n",
             "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
             "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
             "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
V2_NAMESPACE = ("0::/\n", "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
V2_SLURM = ("0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n",
            "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
V2_LEAF = ("0::/job/repbench-procs\n", "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
V1_SUBTREE = ("9:memory:/docker/abc/inner\n", "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup "
              "rw,memory\n")
V1_OUTSIDE = ("9:memory:/other\n", "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")


@pytest.mark.parametrize("texts, expected", [
    (V1_HYBRID, ("/sys/fs/cgroup/memory/process_api/abc", "v1")),     # the v1 memory controller wins on hybrids
    (V2_NAMESPACE, ("/sys/fs/cgroup", "v2")),                           # a container's own namespace root
    (V2_SLURM, ("/sys/fs/cgroup/system.slice/slurmstepd.scope/job_7/step_0/user/task_0", "v2")),
    (V2_LEAF, ("/sys/fs/cgroup/job", "v2")),                            # inside the leaf an earlier probe made
    (V1_SUBTREE, ("/sys/fs/cgroup/memory/inner", "v1")),                # a bind-mounted subtree
])
def test_memory_cgroup_of_is_the_process_own(texts, expected):
    path, version = probes.memory_cgroup_of(*texts)
    assert (str(path), version) == expected


def test_memory_cgroup_of_outside_the_mount_or_without_memory():
    assert probes.memory_cgroup_of(*V1_OUTSIDE)[0] is None
    assert probes.memory_cgroup_of("1:cpu:/\n", V1_HYBRID[1]) == (None, "this process is in no memory cgroup")


def test_probe_cgroups_are_made_inside_the_own_cgroup_and_leftovers_removed():
    home, version = probes._cgroup_home()
    if home is None:
        pytest.skip(f"no writable memory cgroup here ({version}): the RLIMIT_AS fallback is tested below")
    own, _ = probes.memory_cgroup_of(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    assert home == own
    with probes.memory_cgroup(2 ** 30) as (path, why_not):
        assert why_not is None and path.parent == own and path.name.startswith(f"repbench-probe-{os.getpid()}-")
        limit = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        assert int((path / limit).read_text()) == 2 ** 30
    assert not path.exists()
    dead = own / "repbench-probe-999999999-0"  # a probe whose process was killed (no such pid)
    dead.mkdir()
    try:
        probes._cgroup_home.cache_clear()
        assert probes._cgroup_home()[0] == own and not dead.exists()
    finally:
        if dead.exists():
            dead.rmdir()


def test_rlimit_fallback_allocation_failure_is_an_oom(monkeypatch):
    monkeypatch.setenv("REPBENCH_MEMORY_CAP", "rlimit")
    m = probes.probe_train_memory(lambda: build_classifier("resnet18", "dbb", num_classes=10), 64, 224, 10,
                                  cap_gb=0.05)
    assert m.oom and m.value is None and "OOM at budget 0.05 GiB" in m.method and "RLIMIT_AS" in m.method
    ok = probes.probe_train_memory(tiny, 2, 32, 4, cap_gb=2)
    assert not ok.oom and ok.value > 0 and "RLIMIT_AS" in ok.method and "REPBENCH_MEMORY_CAP=rlimit" in ok.method


def test_a_peak_over_the_budget_is_an_oom_whatever_the_limit_let_through(monkeypatch):
    """A child may reuse free heap it inherited, which neither RLIMIT_AS nor a cgroup charge sees: the measured peak
    decides (the budget stands for the device's memory)."""
    monkeypatch.setattr(probes, "run_capped", lambda fn, args, cap: ("ok", (0.3 * probes.GIB, 0.1 * probes.GIB),
                                                                     "some limit", 1))
    over = probes.probe_train_memory(tiny, 2, 32, 4, cap_gb=0.25)
    assert over.oom and over.value is None and "OOM at budget 0.25 GiB" in over.method and "0.30 GiB" in over.method
    under = probes.probe_train_memory(tiny, 2, 32, 4, cap_gb=0.5)
    assert not under.oom and under.value == pytest.approx(0.3)


def test_rlimit_counts_what_the_child_inherits(tmp_path):
    """A parent that worked before leaves free heap and reserved arena regions: mapped already, RLIMIT_AS would not
    count them. The budget is what the child may use in all."""
    import subprocess
    import sys

    script = tmp_path / "worked.py"
    script.write_text(
        "import os, torch\n"
        "from torch import nn\n"
        "from runners import probes\n"
        "xs = [torch.randn(1 << 22) for _ in range(100)]\n"
        "del xs\n"
        "conv = nn.Conv2d(64, 64, 3)\n"
        "y = conv(torch.randn(16, 64, 64, 64))\n"
        "y.sum().backward()\n"
        "del y, conv\n"
        "model = lambda: nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.AdaptiveAvgPool2d(1), "
        "nn.Flatten(), nn.Linear(64, 4))\n"
        "print(probes.probe_train_memory(model, 16, 64, 4, cap_gb=0.01).oom)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "REPBENCH_MEMORY_CAP": "rlimit"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_a_run_under_rlimit_with_a_tiny_budget_records_the_oom_and_finishes(tmp_path, monkeypatch):
    from results import Store
    from runners.jobs import execute, plan
    from suites import Recipe
    from suites.base import Row, Table

    monkeypatch.setenv("REPBENCH_MEMORY_CAP", "rlimit")
    recipe = Recipe(dataset="synthetic", resolution=32, batch=2, cost_batch=2, cost_resolution=32, cost_warmup=1,
                    cost_steps=1, throughput_batch=2, memory_cap_gb=0.01, train_accuracy=False, checkpoints=False)
    table = Table("orepa", "tiny", "tiny", "test", ("train_memory", "time_per_batch"),
                  (Row("G/None", "resnet18", "none", group="G"), Row("G/DBB", "resnet18", "dbb", group="G")),
                  {"smoke": recipe}, baselines={"G": "G/None"})
    url = f"sqlite:///{tmp_path}/r.sqlite"
    store = Store(url)
    (job,) = plan(table, "smoke", 1, ["G/DBB"], str(tmp_path), url, artifacts_root=str(tmp_path / "art"))
    assert job.config["baseline"]["row"] == "G/None" and job.config["baseline"]["rep"] == "none"
    job.run_id = store.ensure_run(job.spec).id
    assert execute(job) == "finished"
    metrics = store.metrics_frame("orepa.tiny").set_index("name")
    memory = metrics.loc["train_memory"]
    assert memory.value is None or math.isnan(memory.value)
    assert "OOM at budget 0.01 GiB" in memory.method and "RLIMIT_AS" in memory.method
    assert "not timed" in metrics.loc["time_per_batch", "method"]
    assert metrics.loc["params_deploy", "value"] > 0 and "latency_ratio" in metrics.index
    store.close()





@pytest.mark.parametrize("late", [False, True])
def test_memory_children_of_the_clean_fork_server_use_the_timing_threads(tmp_path, late):
    """A process that already ran parallel ops cannot fork a child that uses OpenMP threads (it hangs); its server,
    forked while the process was fresh, can: memory is measured at the timing's thread count. Started too late (after
    parallel work), the server's child would hang in its first parallel op: the probe notices (no 'ready' within
    READY_TIMEOUT_S), kills it and measures with one thread, and later probes use one thread without waiting."""
    import subprocess
    import sys

    work = "nn.functional.conv2d(torch.randn(8, 16, 64, 64), torch.randn(16, 16, 3, 3))  # an OpenMP pool now\n"
    script = tmp_path / "server.py"
    script.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from runners import probes\n"
        "probes.READY_TIMEOUT_S = 3\n"
        "def model():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n"
        "torch.set_num_threads(2)\n"
        + (work if late else "") + "probes.start_clean_fork_server()\n" + ("" if late else work) +
        "for _ in range(2):\n"
        "    m = probes.probe_train_memory(model, 8, 64, 4, cap_gb=2)\n"
        "    print('threads', m.threads, m.value > 0)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [f"threads {1 if late else 2} True"] * 2


def test_the_fork_server_ignores_the_signals_its_parent_handles(tmp_path):
    """Slurm signals every process of a step: SIGUSR2 to the server must not run the parent's handler there (under
    submitit that handler requeues the job), nor stop the server."""
    import signal
    import time

    marker = tmp_path / "handler ran"
    previous = signal.signal(signal.SIGUSR2, lambda *_: marker.write_text(str(os.getpid())))
    server = probes.CleanForkServer()
    try:
        assert server.run(probes._status_kib, ("VmRSS",), 1 << 30, 1)[0] == "ok"  # the server is serving
        os.kill(server.pid, signal.SIGUSR2)
        time.sleep(0.5)
        status, result, _, threads = server.run(probes._status_kib, ("VmRSS",), 1 << 30, 1)
        assert (status, threads) == ("ok", 1) and result > 0 and not marker.exists()
    finally:
        signal.signal(signal.SIGUSR2, previous)
        server._conn.close()
        os.waitpid(server.pid, 0)
