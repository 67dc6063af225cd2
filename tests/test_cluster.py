"""Cluster execution: claims under contention, concurrent workers and invocations, faults (kill -9, a database that
stops, requeue), a real single-node Slurm (conftest.Slurm) and a real PostgreSQL server, and secrets."""

import contextlib
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import suites
from conftest import Postgres, fresh_postgres_url
from results import LeaseLost, MetricRecord, Store
from runners.jobs import plan

ROWS = ["ResNet-18/None", "RepVGG-A0/RepVGG", "ResNet-18/OREPA"]
TABLE = suites.get_table("table4")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/r.sqlite"
    return fresh_postgres_url(request.getfixturevalue("postgres_server"))


def run_suite(*args, env=None, **kwargs):
    """``run_suite`` as a user starts it: its own process, the project's environment."""
    return subprocess.Popen([sys.executable, "-c", "import sys; from runners.cli import main; sys.exit(main())",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_until(condition, timeout=300, poll=0.3, what="condition", explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}\n{explain()}")


def assert_each_run_once(url, rows, attempts=1):
    """Every run finished at ``attempts``, one attempt row each, and every run's metrics complete: the same
    (name, step) set for every run, none duplicated."""
    store = Store(url, migrate=False)
    try:
        runs = store.runs_frame(TABLE.key)
        assert sorted(runs.row_name) == sorted(rows)
        assert set(runs.status) == {"finished"}, runs[["row_name", "status", "error"]]
        assert set(runs.attempt) == {attempts}
        tried = store.attempts_frame(TABLE.key)
        assert len(tried) == len(runs) * attempts and set(tried[tried.attempt == attempts].status) == {"finished"}
        metrics = store.metrics_frame(TABLE.key, history=True)
        keys = {run_id: sorted(zip(group.name, group.step)) for run_id, group in metrics.groupby("run_id")}
        assert len(keys) == len(runs)
        reference = next(iter(keys.values()))
        assert len(set(reference)) == len(reference)  # no (name, step) twice
        assert {"top1", "train_memory", "time_per_batch", "latency", "params_deploy"} <= {name for name, _ in reference}
        assert all(k == reference for k in keys.values()), {r: set(k) ^ set(reference) for r, k in keys.items()}
        return runs, metrics
    finally:
        store.close()


# -- the claim itself ------------------------------------------------------------------------------------------------
def _claimer(url, run_ids, since, queue):
    store = Store(url, migrate=False)
    won = []
    for run_id in random.Random(os.getpid()).sample(run_ids, len(run_ids)):
        claim = store.claim(run_id, lease_s=60, host="h", pid=os.getpid(), executor="local", since_ms=since,
                            force=True)
        if claim is not None:
            won.append(run_id)
    store.close()
    queue.put(won)


def test_a_run_is_claimed_exactly_once(db_url):
    """8 processes race for 20 runs (with --force's rules, the most permissive): each run goes to exactly one. A
    live lease is never taken; an expired one is, as a new attempt, and the old worker's writes are refused."""
    from results import RunSpec
    from results.models import now_ms
    store = Store(db_url)
    ids = [store.ensure_run(RunSpec(f"k{i}", "t", f"row {i}", "smoke", 0, "c", {"i": i})).id for i in range(20)]
    context = mp.get_context("fork")  # the claimers use no torch: forking this process is safe and fast
    queue = context.Queue()
    since = now_ms()
    workers = [context.Process(target=_claimer, args=(db_url, ids, since, queue)) for _ in range(8)]
    for w in workers:
        w.start()
    won = [run_id for _ in workers for run_id in queue.get(timeout=120)]
    for w in workers:
        w.join(60)
    assert sorted(won) == sorted(ids)
    runs = store.runs_frame("t")
    assert set(runs.attempt) == {1} and set(runs.status) == {"running"}

    run_id = ids[0]
    assert store.claim(run_id, lease_s=60, host="h2", pid=1, executor="local", force=True) is None  # live lease
    old = store.claim(ids[1], lease_s=0.05, host="other-node", pid=1, executor="slurm")
    assert old is None  # still held by the race's winner
    first = store.claim(store.ensure_run(RunSpec("x", "t", "x", "smoke", 0, "c", {})).id, lease_s=0.2,
                        host="other-node", pid=1, executor="slurm")
    store.log_metrics(first.run_id, [MetricRecord("m", 1.0, "s")], owner=first.owner)
    time.sleep(0.3)  # the other node's worker stops heartbeating: its lease expires
    second = store.claim(first.run_id, lease_s=60, host="h", pid=2, executor="local")
    assert second is not None and second.attempt == 2
    assert store.metrics_frame("t").empty  # the lost attempt's partial metrics went with it
    with pytest.raises(LeaseLost):
        store.log_metrics(first.run_id, [MetricRecord("m", 9.0, "s")], owner=first.owner)
    assert not store.renew(first, 60) and store.renew(second, 60)
    assert not store.finish_run(first.run_id, "finished", claim=first)
    store.log_metrics(second.run_id, [MetricRecord("m", 2.0, "s")], owner=second.owner)
    assert store.finish_run(second.run_id, "failed", error="boom", traceback="tb", claim=second)
    attempts = store.attempts_frame("t")
    attempts = attempts[attempts.run_id == first.run_id]
    assert list(attempts.status) == ["lost", "failed"] and attempts.traceback.iloc[1] == "tb"
    # a failure from before this invocation is retried; one from after it (another invocation's) is not
    assert store.claim(first.run_id, lease_s=60, host="h", pid=3, executor="local", since_ms=now_ms() - 60_000) is None
    assert store.claim(first.run_id, lease_s=60, host="h", pid=3, executor="local", since_ms=now_ms() + 1).attempt == 3
    store.close()


# -- concurrent workers and invocations on one database ---------------------------------------------------------------
def _execute_all(jobs, order_seed):
    from runners.jobs import execute
    for job in random.Random(order_seed).sample(jobs, len(jobs)):
        execute(job)


@pytest.mark.slow
def test_eight_workers_execute_each_run_once(db_url, tmp_path):
    jobs = plan(TABLE, "smoke", 1, ROWS, str(tmp_path), db_url, artifacts_root=str(tmp_path / "artifacts"))
    store = Store(db_url)
    for job in jobs:
        job.run_id = store.ensure_run(job.spec).id
    store.close()
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "runners.jobs", "backbones"])
    workers = [context.Process(target=_execute_all, args=(jobs, seed)) for seed in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    assert [w.exitcode for w in workers] == [0] * 8
    assert_each_run_once(db_url, ROWS)


@pytest.mark.slow
def test_three_invocations_started_together(db_url, tmp_path):
    args = ["table4", "--only", *ROWS, "--db", db_url, "--data-root", str(tmp_path / "data"), "--artifacts",
            str(tmp_path / "artifacts")]
    (tmp_path / "data").mkdir()
    invocations = [run_suite(*args, cwd=tmp_path) for _ in range(3)]
    results = [finish(p) for p in invocations]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert_each_run_once(db_url, ROWS)
    assert sum(out.count("finished: top-1") for _, out, _ in results) == len(ROWS)  # trained once in all
    assert not list(Path(tmp_path).glob("*.lock")) and not list(Path(tmp_path).glob("**/*.sqlite.lock"))


# -- faults -----------------------------------------------------------------------------------------------------------
def running_run(url, row=None, timeout=300) -> dict:
    """Wait until a run (of ``row``) is ``running``; its database row as a dict."""
    def find():
        try:
            store = Store(url, migrate=False)
        except Exception:  # noqa: BLE001 - not created yet
            return None
        try:
            runs = store.runs_frame()
            runs = runs[(runs.status == "running") & ((runs.row_name == row) if row else True)]
            return runs.iloc[0].to_dict() if len(runs) else None
        finally:
            store.close()
    return wait_until(find, timeout, what=f"{row or 'a run'} running")


@pytest.mark.slow
def test_killed_invocation_is_retried_and_sigterm_stops_the_workers(tmp_path):
    """kill -9 of run_suite alone (not its process group): its worker stops itself, the run stays 'running' under
    a lease; the next invocation sees the owner is gone (same host), expires the lease and retries the run as
    attempt 2. SIGTERM to run_suite stops its worker."""
    url = f"sqlite:///{tmp_path}/r.sqlite"
    args = ["table4", "--only", ROWS[0], "--db", url, "--data-root", str(tmp_path), "--artifacts",
            str(tmp_path / "a")]
    first = run_suite(*args, cwd=tmp_path, start_new_session=True)
    run = running_run(url)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(60)
    try:
        wait_until(lambda: not _alive(int(run["pid"])), 30, what="the worker to die with its parent")
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its group, if the test failed
            os.killpg(first.pid, signal.SIGKILL)
    code, out, err = finish(run_suite(*args, cwd=tmp_path))
    assert code == 0, err
    assert_each_run_once(url, [ROWS[0]], attempts=2)
    store = Store(url, migrate=False)
    assert list(store.attempts_frame().status) == ["lost", "finished"]
    store.close()

    args[2] = ROWS[1]
    second = run_suite(*args, cwd=tmp_path)
    run = running_run(url, ROWS[1])
    second.send_signal(signal.SIGTERM)
    code, out, err = finish(second, 120)
    assert code == 130 and "resumes the unfinished runs" in out, (out, err)
    assert not _alive(int(run["pid"]))
    store = Store(url, migrate=False)
    runs = store.runs_frame().set_index("row_name")
    assert runs.loc[ROWS[1], "status"] in ("failed", "scheduled")
    store.close()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slow
def test_database_stopped_mid_run(tmp_path):
    """PostgreSQL stops while a run works: the worker and run_suite say so (one line, no password), nothing is
    marked finished; with the server back, the next invocation retries the run to the end."""
    server = Postgres()
    try:
        url = server.url()
        args = ["table4", "--only", ROWS[0], "--db", url, "--data-root", str(tmp_path), "--artifacts",
                str(tmp_path / "a")]
        process = run_suite(*args, cwd=tmp_path)
        running_run(url)
        server.stop()
        code, out, err = finish(process, 300)
        assert code != 0 and "database" in (out + err) and "Traceback" not in out
        server.start()
        store = Store(url, migrate=False)
        assert "finished" not in set(store.runs_frame().status)
        store.close()
        code, out, err = finish(run_suite(*args, cwd=tmp_path))
        assert code == 0, err
        assert_each_run_once(url, [ROWS[0]], attempts=2)
    finally:
        server.remove()


# -- a real Slurm ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_slurm_fills_the_same_rows_as_local(slurm, postgres_server, tmp_path):
    """Submission returns at once with the job ids; 'run_suite status' shows the runs while they work; --wait
    follows them; the database ends with the rows and metric counts of the local executor's run."""
    rows = ROWS[:2]
    local_url = f"sqlite:///{tmp_path}/local.sqlite"
    code, out, err = finish(run_suite("table4", "--only", *rows, "--db", local_url, "--data-root", str(tmp_path),
                                      "--artifacts", str(tmp_path / "la"), cwd=tmp_path))
    assert code == 0, err
    url = fresh_postgres_url(postgres_server)
    start = time.monotonic()
    code, out, err = finish(run_suite("table4", "--executor", "slurm", "--only", *rows, "--db", url, "--data-root",
                                      str(tmp_path), "--artifacts", str(tmp_path / "sa"), cwd=tmp_path))
    assert code == 0 and "submitted 2 run(s)" in out and "run_suite status" in out, (out, err)
    assert time.monotonic() - start < 60
    seen = wait_until(lambda: (s := finish(run_suite("status", "table4", "--db", url)))[0] == 0
                      and " running " in s[1] and s[1], 300, what="status showing a running run")
    assert "smoke" in seen and "vm" in seen or os.uname().nodename in seen
    code, out, err = finish(run_suite("status", "table4", "--db", url, "--wait"))
    assert code == 0 and out.count("│ finished ") == 2 and "(2 runs)" in out, (out, err)
    local_runs, local_metrics = assert_each_run_once(local_url, rows)
    runs, metrics = assert_each_run_once(url, rows)
    assert set(runs.executor) == {"slurm"} and all(runs.slurm_job_id.str.match(r"^\d+_\d$"))
    count = lambda m: m.groupby(["row_name"]).size().to_dict()  # noqa: E731
    assert count(metrics) == count(local_metrics)
    again = finish(run_suite("table4", "--executor", "slurm", "--only", *rows, "--db", url, cwd=tmp_path))
    assert again[0] == 0 and "nothing to do" in again[1]


@pytest.mark.slow
def test_srun_ddp_two_tasks(slurm, postgres_server, tmp_path):
    url = fresh_postgres_url(postgres_server)
    code, out, err = finish(run_suite("table4", "--executor", "slurm", "--devices", "2", "--only", ROWS[2], "--db",
                                      url, "--data-root", str(tmp_path), "--artifacts", str(tmp_path / "a"),
                                      "--wait", cwd=tmp_path))
    assert code == 0, (out, err)
    runs, _ = assert_each_run_once(url, [ROWS[2]])
    store = Store(url, migrate=False)
    assert store.params_of(int(runs.id.iloc[0]))["world_size"] == 2
    store.close()
    logs = "".join(p.read_text() for p in (tmp_path / "results/slurm").glob("*/*_log.out"))
    assert "2 process(es)" in logs


def long_job(tmp_path, url, epochs=30):
    """A smoke job that trains long enough to be interrupted, checkpointing every epoch."""
    [job] = plan(TABLE, "smoke", 1, [ROWS[0]], str(tmp_path), url, "slurm", artifacts_root=str(tmp_path / "a"))
    recipe = {**job.config["recipe"], "epochs": epochs, "max_iters": None, "checkpoints": True}
    job.config = {**job.config, "recipe": recipe}
    return job


def release_requeued(job_id):
    """Slurm holds a requeued job back (its begin time moves 2 minutes on once it is pending again): start it now."""
    wait_until(lambda: subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                                      text=True).stdout.strip() == "PENDING", 120, poll=0.5, what="the job pending")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)


@pytest.mark.slow
def test_requeued_job_resumes_from_its_checkpoint(slurm, postgres_server, tmp_path):
    """scontrol requeue (SIGTERM: checkpoint, the run goes back to scheduled) and Slurm's pre-timeout signal
    (SIGUSR2: checkpoint, the job requeues itself): each time the requeued job claims the run again and resumes."""
    from runners.slurm import Site, SlurmExecutor
    url = fresh_postgres_url(postgres_server)
    store = Store(url)
    job = long_job(tmp_path, url)
    job.run_id = store.ensure_run(job.spec).id
    [job_id] = SlurmExecutor(Site(folder=str(tmp_path / "slurm")), TABLE.resources["smoke"]).submit([job], store)

    def newest_checkpoint():
        frame = store.artifacts_frame(job.run_id)
        return frame[frame.kind == "checkpoint"].epoch.max() if (frame.kind == "checkpoint").any() else 0

    seen = 0
    for how, attempt in (("requeue", 1), ("usr2", 2)):
        wait_until(lambda: store.runs([job.run_id])[job.run_id].attempt == attempt and newest_checkpoint() > seen,
                   300, what=f"attempt {attempt} checkpointing")
        seen = newest_checkpoint()
        if how == "requeue":
            subprocess.run(["scontrol", "requeue", job_id], check=True)
        else:
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_until(lambda: store.attempts_frame().status.iloc[-1] == "preempted", 120,
                   what=f"attempt {attempt} preempted", explain=lambda: f"{store.attempts_frame()}\n" + "".join(
                       p.read_text()[-3000:] for p in sorted((tmp_path / "slurm").rglob("*_log.*"))))
        # the checkpoint written on the signal: the next attempt must write a newer one (be training, its signal
        # handlers in place) before it is signalled in turn
        seen = newest_checkpoint()
        release_requeued(job_id)
    wait_until(lambda: store.runs([job.run_id])[job.run_id].status == "finished", 600, what="the run to finish")
    attempts = store.attempts_frame()
    assert list(attempts.status) == ["preempted", "preempted", "finished"]
    assert set(attempts.slurm_job_id) == {job_id}
    log = (job.run_dir / "run.log").read_text()
    assert log.count("resuming from") == 2, log
    epochs = store.metrics_frame(history=True)
    steps = sorted(epochs[epochs.name == "top1"].step.tolist())
    assert len(steps) == 30 and steps == [steps[0] * e for e in range(1, 31)]  # every epoch once
    store.close()


# -- secrets ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_password_is_never_shown_or_written(slurm, postgres_server, tmp_path):
    secret = "SOMEPASSWORD"
    name = fresh_postgres_url(postgres_server).rsplit("/", 1)[1]
    url = postgres_server.url(secret).rsplit("/", 1)[0] + f"/{name}"  # trust auth: the password is sent, ignored
    outputs = []
    common = ["--data-root", str(tmp_path), "--artifacts", str(tmp_path / "a")]
    for args in (["table4", "--only", ROWS[0], "--db", url, *common],
                 ["table4", "--executor", "slurm", "--only", ROWS[1], "--db", url, "--wait", *common],
                 ["table4", "--only", ROWS[0], "--db", url.replace(str(postgres_server.port), "1"), *common],
                 ["table4", "--only", ROWS[0], "--db", url.replace("postgres", "nobody", 1), *common],
                 ["table4", "--only", "no such row", "--db", url],
                 ["status", "table4", "--db", url], ["report", "table4", "--db", url, "--out", str(tmp_path / "r")]):
        outputs.append(finish(run_suite(*args, cwd=tmp_path)))
    assert outputs[0][0] == 0 and outputs[1][0] == 0, outputs[:2]
    assert "***" in outputs[0][1]
    for code, out, err in outputs:
        assert secret not in out and secret not in err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    store = Store(url, migrate=False)
    with store.engine.connect() as c:
        from sqlalchemy import inspect, text
        for table in inspect(store.engine).get_table_names():
            dump = str(c.execute(text(f"SELECT * FROM {table}")).fetchall())
            assert secret not in dump, table
    store.close()
