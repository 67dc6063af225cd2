"""Executors: the local one isolates each job; the slurm one runs the same jobs as a submitit array (here with
submitit's local and debug executors, as submitit's own tests do; against a real Slurm in test_cluster.py), with the
resources and site settings a cluster needs."""

import json

import pytest

import suites
from results import Store
from runners.executors import LocalExecutor
from runners.slurm import Site, SlurmExecutor, slurm_parameters
from runners.jobs import plan

ROWS = ["ResNet-18/None", "RepVGG-A0/RepVGG"]


def run(executor, tmp_path, rows=ROWS):
    url = f"sqlite:///{tmp_path}/r.sqlite"
    store = Store(url)
    jobs = plan(suites.get_table("table4"), "smoke", 1, rows, str(tmp_path), url, executor.name,
                artifacts_root=str(tmp_path / "artifacts"))
    for job in jobs:
        job.run_id = store.ensure_run(job.spec).id
    seen = []
    executor.run(jobs, store, lambda job, status: seen.append((job.spec.row_name, status)))
    return store, seen


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_submitit_array(tmp_path, cluster):
    url = f"sqlite:///{tmp_path}/r.sqlite"
    store = Store(url)
    jobs = plan(suites.get_table("table4"), "smoke", 1, ROWS, str(tmp_path), url, "slurm",
                artifacts_root=str(tmp_path / "artifacts"))
    for job in jobs:
        job.run_id = store.ensure_run(job.spec).id
    executor = SlurmExecutor(Site(folder=str(tmp_path / "slurm")), suites.get_table("table4").resources["smoke"],
                             cluster=cluster)
    ids = executor.submit(jobs, store)
    assert [handle.result() for handle in executor.submitted] == ["finished", "finished"]
    runs = store.runs_frame()
    assert sorted(runs.slurm_job_id) == sorted(ids)
    assert set(runs.status) == {"finished"} and set(runs.executor) == {"slurm"}
    metrics = store.metrics_frame()
    assert {"top1", "train_memory", "time_per_batch"} <= set(metrics.name)


def test_slurm_resources_follow_the_recipe_and_the_site(tmp_path):
    """Paper scale asks for GPUs (one task per GPU, a run wider than a node spans nodes); smoke for CPUs only; the
    site file adds partition, account, extra lines and the throttle; bad site files say what is wrong."""
    table = suites.get_table("table4")
    site_file = tmp_path / "site.toml"
    site_file.write_text('partition = "gpu"\naccount = "proj"\ngpus_per_node = 4\narray_parallelism = 3\n'
                         'setup = ["module load cuda"]\n[sbatch]\nexclusive = true\n')
    site = Site.load(site_file, qos="high")
    paper = slurm_parameters(table.resources["paper"], 8, site, "t")
    assert paper["nodes"] == 2 and paper["tasks_per_node"] == 4 and paper["slurm_gres"] == "gpu:4"
    assert paper["cpus_per_task"] == 8 and paper["mem_gb"] == 4 * 48 and paper["timeout_min"] == 24 * 60
    assert paper["slurm_partition"] == "gpu" and paper["slurm_account"] == "proj" and paper["slurm_qos"] == "high"
    assert paper["slurm_array_parallelism"] == 3 and paper["slurm_setup"] == ["module load cuda"]
    assert paper["slurm_additional_parameters"] == {"exclusive": True}
    smoke = slurm_parameters(table.resources["smoke"], 2, Site(gpu_request="gpus-per-node"), "t")
    assert smoke["nodes"] == 1 and smoke["tasks_per_node"] == 2 and "slurm_gres" not in smoke
    assert "gpus_per_node" not in smoke and "slurm_partition" not in smoke
    gpus = slurm_parameters(table.resources["paper"], 4, Site(gpu_request="gpus-per-node"), "t")
    assert gpus["gpus_per_node"] == 4 and "slurm_gres" not in gpus
    with pytest.raises(ValueError, match="do not split evenly"):
        slurm_parameters(table.resources["paper"], 5, Site(gpus_per_node=4), "t")
    site_file.write_text('partitoin = "gpu"\n')
    with pytest.raises(ValueError, match="unknown key.*partitoin"):
        Site.load(site_file)
    with pytest.raises(ValueError, match="No such file"):
        Site.load(tmp_path / "missing.toml")


def test_local_executor_isolates_a_failing_job(tmp_path, monkeypatch):
    """A job whose worker dies is recorded as failed; the next job still runs."""
    url = f"sqlite:///{tmp_path}/r.sqlite"
    store = Store(url)
    jobs = plan(suites.get_table("table4"), "smoke", 1, ROWS, str(tmp_path), url,
                artifacts_root=str(tmp_path / "artifacts"))
    jobs[0].config = {**jobs[0].config, "arch": "no_such_arch"}  # fails inside the worker
    for job in jobs:
        job.run_id = store.ensure_run(job.spec).id
    seen = []
    LocalExecutor().run(jobs, store, lambda job, status: seen.append(status))
    assert seen == ["failed", "finished"]
    failed = store.runs_frame().set_index("row_name").loc[ROWS[0]]
    assert "unknown arch" in failed.error


def test_cost_benchmark_plumbing(tmp_path):
    """As a user runs it (a fresh process: its memory children use the timing's threads): every method's numbers
    and its ratio to plain, measured side by side."""
    import subprocess
    import sys
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, "-m", "runners.cost_benchmark", "--cell", "2x32", "--warmup", "1",
                           "--steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    [cell] = json.loads(out.read_text())
    assert set(cell["cell"]) == {"none", "dbb", "orepa", "orepa offline_bn"}
    assert cell["cell"]["none"]["time_x"] == 1.0 and cell["cell"]["none"]["memory_x"] == 1.0
    assert all(m["time_s"] > 0 and m["memory_gib"] > 0 for m in cell["cell"].values())
    assert all(m["memory_threads"] == cell["threads"] for m in cell["cell"].values())
    assert cell["cell"]["orepa"]["time_x_q1"] <= cell["cell"]["orepa"]["time_x"] <= cell["cell"]["orepa"]["time_x_q3"]
    assert cell["orepa_extra_memory_over_dbb"] is not None and "other_cpu_share" in cell["load"]
    bad = subprocess.run([sys.executable, "-m", "runners.cost_benchmark", "--cell", "bad"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "BATCHxRES" in bad.stderr


def _exit_with(code, delay):
    import sys
    import time
    time.sleep(delay)
    sys.exit(code)


def test_one_failing_rank_stops_the_group():
    """A rank that dies takes its peers down at once, instead of leaving them waiting in a collective."""
    import multiprocessing as mp
    import time

    from runners.executors import _join_group
    context = mp.get_context("spawn")
    processes = [context.Process(target=_exit_with, args=(0, 120)), context.Process(target=_exit_with, args=(1, 0))]
    for p in processes:
        p.start()
    start = time.perf_counter()
    codes = _join_group(processes, poll_s=0.05)
    assert time.perf_counter() - start < 60
    assert codes[1] == 1 and codes[0] not in (0, None)
