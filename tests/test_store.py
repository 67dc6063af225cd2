"""The results store on SQLite and on a real PostgreSQL server started by the tests."""

import math

import pytest
from sqlalchemy import inspect, text

from results import MetricRecord, RunSpec, SchemaMissing, Store, StoreError, check_url
from runners.jobs import config_hash, run_key


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/nested/dir/results.sqlite")
    else:
        url = request.getfixturevalue("postgres_url")
        s = Store(url)
        with s.engine.begin() as c:  # each test starts from an empty store
            c.execute(text("TRUNCATE runs, params, metrics, environments, artifacts, attempts RESTART IDENTITY CASCADE"))
    yield s
    s.close()


def spec(row="ResNet-18/None", seed=0, config=None):
    config = config or {"arch": "resnet18", "recipe": {"batch": 2}, "variant": {"branches": ["origin"]}}
    chash = config_hash(config)
    return RunSpec(run_key("orepa.table4", row, "smoke", seed, chash), "orepa.table4", row, "smoke", seed, chash,
                   config)


def test_migrations_from_empty_reach_head(store):
    assert store.schema_revision() == "0005"
    tables = set(inspect(store.engine).get_table_names())
    assert {"runs", "params", "metrics", "environments", "artifacts", "attempts", "events", "alembic_version"} <= tables
    store.upgrade()  # idempotent
    assert store.schema_revision() == "0005"


def test_round_trip(store):
    run = store.ensure_run(spec())
    store.claim(run.id, lease_s=60, pid=123, host="h", executor="local")
    store.log_environment(run.id, dict(git_commit="abc", git_dirty=True, python="3.11.7", torch="2.13.0",
                                       cuda=None, mmcv="2.1.0", device_name="cpu", host="h", platform="linux"))
    store.log_metrics(run.id, [
        MetricRecord("time_per_batch", 0.125, "s", device="cpu", batch=2, resolution=32, dtype="float32",
                     threads=2, method="median"),
        MetricRecord("top1", float("nan"), "%", step=7),
        MetricRecord("train_memory", None, "GiB", method="OOM at budget 1 GiB")])
    store.finish_run(run.id, "diverged", error="loss became nan", diverged_step=7)
    runs = store.runs_frame("orepa.table4")
    assert list(runs.status) == ["diverged"] and runs.diverged_step.iloc[0] == 7 and runs.attempt.iloc[0] == 1
    metrics = store.metrics_frame("orepa.table4").set_index("name")
    assert metrics.loc["time_per_batch", "value"] == 0.125 and metrics.loc["time_per_batch", "threads"] == 2
    assert metrics.loc["time_per_batch", "method"] == "median" and metrics.loc["time_per_batch", "unit"] == "s"
    assert math.isnan(metrics.loc["top1", "value"]) and metrics.loc["top1", "step"] == 7
    assert metrics.loc["train_memory", "value"] is None or math.isnan(metrics.loc["train_memory", "value"])
    assert not metrics.loc["train_memory", "is_nan"]
    assert store.params_of(run.id) == {"arch": "resnet18", "recipe.batch": 2, "variant.branches": ["origin"]}
    env = store.environments_frame("orepa.table4").iloc[0]
    assert env.git_commit == "abc" and bool(env.git_dirty) and env.mmcv == "2.1.0"


def test_artifacts_and_per_epoch_metrics(store):
    run = store.ensure_run(spec())
    store.claim(run.id, lease_s=60, pid=1, host="h", executor="local")
    store.log_metrics(run.id, [MetricRecord("top1", 40.0, "%", step=10), MetricRecord("top1", 55.5, "%", step=20),
                               MetricRecord("train_loss", 1.5, "nats", step=20)])
    final = store.metrics_frame("orepa.table4").set_index("name")
    assert final.loc["top1", "value"] == 55.5 and final.loc["top1", "step"] == 20  # the last step is the result
    history = store.metrics_frame("orepa.table4", history=True)
    assert sorted(history[history.name == "top1"].step) == [10, 20]
    store.log_artifact(run.id, "checkpoint", "/a/state-e1.pth", 10, "0" * 64, 1)
    store.log_artifact(run.id, "checkpoint", "/a/state-e2.pth", 11, "1" * 64, 2)
    store.log_artifact(run.id, "checkpoint", "/a/state-e2.pth", 12, "2" * 64, 2)  # rewritten: updated, not added
    store.log_artifact(run.id, "weights_deploy", "/a/weights-deploy.pth", 5, "3" * 64, 2)
    store.remove_artifacts(run.id, path="/a/state-e1.pth")
    artifacts = store.artifacts_frame(run.id).set_index("path")
    assert sorted(artifacts.index) == ["/a/state-e2.pth", "/a/weights-deploy.pth"]
    assert artifacts.loc["/a/state-e2.pth", "size_bytes"] == 12 and artifacts.loc["/a/state-e2.pth", "sha256"] == "2" * 64
    store.expire_leases_of_dead("h", lambda pid: False)
    assert store.claim(run.id, lease_s=60, pid=2, host="h", executor="local")  # a retry keeps its checkpoints
    assert len(store.artifacts_frame(run.id)) == 2
    with pytest.raises(ValueError):
        store.log_artifact(run.id, "photo", "/a/x.png", 1, "4" * 64)
    store.remove_artifacts(run.id)
    assert store.artifacts_frame(run.id).empty


def test_structure_events_in_order_and_recorded_once(store):
    """DyRep's grow / cut / collapse of a run, in order, branches as lists; the same event logged again (a resumed
    run repeating an adjustment its checkpoint did not hold) replaces the first record; an unknown kind is refused."""
    run = store.ensure_run(spec())
    store.claim(run.id, lease_s=60, pid=1, host="h", executor="local")
    grow = {"epoch": 0, "kind": "grow", "site": "layer1.0.conv1.conv", "branches": ["origin", "1x1"], "score": 0.5}
    store.log_events(run.id, [grow, {"epoch": 1, "kind": "cut", "site": "layer1.0.conv1.conv", "branches": ["1x1"]}])
    store.log_events(run.id, [{**grow, "score": 0.75}])
    events = store.events_frame("orepa.table4")
    assert list(zip(events.epoch, events.kind, events.branches)) == [(0, "grow", ["origin", "1x1"]),
                                                                    (1, "cut", ["1x1"])]
    assert events.score.iloc[0] == 0.75 and events.score.isna().iloc[1]
    with pytest.raises(ValueError, match="unknown event kind"):
        store.log_events(run.id, [{"epoch": 2, "kind": "prune", "site": "x"}])
    assert len(store.events_frame(run_id=run.id)) == 2


def test_run_keys_are_idempotent(store):
    first = store.ensure_run(spec())
    again = store.ensure_run(spec())
    assert first.id == again.id and len(store.runs_frame()) == 1
    other_seed = store.ensure_run(spec(seed=1))
    other_config = store.ensure_run(spec(config={"arch": "resnet18", "recipe": {"batch": 4}}))
    assert len({first.id, other_seed.id, other_config.id}) == 3


def test_retry_replaces_partial_metrics(store):
    run = store.ensure_run(spec())
    first = store.claim(run.id, lease_s=60, pid=1, host="h", executor="local")
    store.log_metrics(run.id, [MetricRecord("train_memory", 1.0, "GiB")], owner=first.owner)
    assert store.expire_leases_of_dead("h", lambda pid: pid != 1) == [run.id]
    second = store.claim(run.id, lease_s=60, pid=2, host="h", executor="local")
    assert second.attempt == 2 and store.metrics_frame().empty
    store.log_metrics(run.id, [MetricRecord("train_memory", 2.0, "GiB")], owner=second.owner)
    assert store.finish_run(run.id, "finished", claim=second)
    metrics = store.metrics_frame()
    assert list(metrics.value) == [2.0]
    assert store.get_run(run.run_key).attempt == 2
    attempts = store.attempts_frame()
    assert list(attempts.status) == ["lost", "finished"] and "lease expired" in attempts.error.iloc[0]


def test_status_is_constrained(store):
    from sqlalchemy.exc import IntegrityError
    run = store.ensure_run(spec())
    with pytest.raises(IntegrityError):
        store.finish_run(run.id, "exploded")


def test_foreign_keys_enforced(store):
    from sqlalchemy.exc import IntegrityError
    with pytest.raises(IntegrityError):
        store.log_metrics(999, [MetricRecord("x", 1.0, "s")])


def test_sqlite_pragmas(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/db.sqlite")
    with s.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1


@pytest.mark.parametrize("url", ["nonsense", "mysql://u@h/db", "sqlite+nodriver:///x.db", "postgresql+nodriver://x"])
def test_bad_urls(url):
    with pytest.raises(StoreError):
        check_url(url)


def test_unreachable_server_is_a_store_error():
    with pytest.raises(StoreError, match="cannot open database"):
        Store("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_reading_an_empty_database_without_schema(tmp_path):
    import sqlite3
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    with pytest.raises(SchemaMissing):
        Store(f"sqlite:///{tmp_path}/empty.sqlite", migrate=False)
