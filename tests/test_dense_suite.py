"""Dense tables and the finetune command end to end (runners/dense.py, runners/finetune.py): OREPA Table 5's rows
train and evaluate on COCO / Cityscapes generated tiny, with memory and minutes per 50 steps measured beside their
group's baseline; a backbone starts from a classification checkpoint whose run the report names; the finetuned model
is deployed and evaluated again; ``run_suite finetune`` stores its run like any other."""

import hashlib
import sqlite3
from pathlib import Path

import pytest

import suites
from backbones import build_classifier, resolve_variant, save_checkpoint
from results import MetricRecord, RunSpec, Store
from runners.dense import ensure_tiny_coco, find_pretrained
from runners.jobs import sha256_of

from test_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent


def db_rows(path: Path, sql: str):
    with sqlite3.connect(path) as c:
        return c.execute(sql).fetchall()


def classification_run(store: Store, tmp_path: Path, table: str, row: str, arch: str, rep: str, scale: str,
                       status: str = "finished", top1: float | None = 71.25) -> Path:
    """A classification run in the database as jobs.execute leaves one: its config, its final train-form weights
    recorded as an artifact (a real checkpoint file), its top-1."""
    config = {"table": table, "row": row, "scale": scale, "seed": 0, "arch": arch, "rep": rep,
              "variant": resolve_variant(rep, None).as_dict()}
    key = hashlib.sha256(f"{table}/{row}/{rep}/{scale}/{status}".encode()).hexdigest()
    spec = RunSpec(key, table, row, scale, 0, "c" * 64, config)
    run = store.ensure_run(spec)
    claim = store.claim(run.id, lease_s=60, host="test", pid=None, executor="local")
    path = save_checkpoint(build_classifier(arch, rep, num_classes=10), tmp_path / f"{key[:12]}.pth",
                           table=table, row=row)
    store.log_artifact(run.id, "weights_train", str(path), path.stat().st_size, sha256_of(path), 1,
                       owner=claim.owner)
    if top1 is not None:
        store.log_metrics(run.id, [MetricRecord("top1", top1, "%", step=1)], owner=claim.owner)
    store.finish_run(run.id, status, claim=claim)
    return path


def test_the_classification_run_a_backbone_starts_from(tmp_path):
    """find_pretrained: the finished run of the same arch, rep and variant at the scale, with final weights; the
    row's own paper first; unfinished runs, other reps and other scales are not it."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    variant = resolve_variant("none", None).as_dict()
    try:
        assert find_pretrained(store, "resnet18", "none", variant, "paper", "orepa") is None
        classification_run(store, tmp_path, "dyrep.table3", "ResNet-18/Origin", "resnet18", "none", "paper", top1=70.0)
        mine = classification_run(store, tmp_path, "orepa.table4", "ResNet-18/None", "resnet18", "none", "paper")
        classification_run(store, tmp_path, "orepa.table4", "ResNet-18/DBB", "resnet18", "dbb", "paper")
        classification_run(store, tmp_path, "orepa.table4", "ResNet-18/None", "resnet18", "none", "mini")
        hit = find_pretrained(store, "resnet18", "none", variant, "paper", "orepa")
        assert hit["table"] == "orepa.table4" and hit["row"] == "ResNet-18/None" and hit["top1"] == 71.25
        assert hit["path"] == str(mine) and hit["sha256"] == sha256_of(mine)
        assert find_pretrained(store, "resnet18", "none", variant, "paper", "dyrep")["table"] == "dyrep.table3"
        assert find_pretrained(store, "resnet18", "orepa", resolve_variant("orepa", None).as_dict(), "paper",
                               "orepa") is None
    finally:
        store.close()


def test_table5_smoke_fills_its_rows_beside_the_papers(tmp_path):
    """Two rows of OREPA Table 5 at smoke (a detector group's baseline, a segmentor whose group baseline is re-measured
    in its run) in one invocation: each trains, evaluates with mmdet's / mmseg's metric, is deployed and evaluated
    again (the same number), and has its training memory and minutes per 50 steps with the ratio to its group's
    baseline measured in the same run. The detector starts from a classification checkpoint of this suite given with
    --pretrained: the run records its sha256, the report names the run it came from and shows that run's top-1
    beside the mAP."""
    db = tmp_path / "db.sqlite"
    store = Store(f"sqlite:///{db}")
    try:
        ckpt = classification_run(store, tmp_path, "orepa.table4", "ResNet-50/None", "resnet50", "none", "paper")
    finally:
        store.close()
    rows = ["Faster-RCNN/None", "PSPNet/OREPA"]
    done = run_cli("table5", "--only", *rows, "--pretrained", f"Faster-RCNN/None={ckpt}", "--db", f"sqlite:///{db}",
                   "--data-root", str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    status = dict(db_rows(db, "SELECT row_name, status FROM runs WHERE table_name = 'orepa.table5'"))
    assert status == {row: "finished" for row in rows}
    values = {(r, m): v for r, m, v in db_rows(db, "SELECT r.row_name, m.name, m.value FROM metrics m JOIN runs r "
                                                   "ON m.run_id = r.id WHERE r.table_name = 'orepa.table5'")}
    for row, metric in (("Faster-RCNN/None", "map"), ("PSPNet/OREPA", "miou")):
        assert 0.0 <= values[row, metric] <= 100.0
        assert values[row, f"{metric}_deployed"] == pytest.approx(values[row, metric], abs=1e-6)
        assert values[row, "train_memory"] > 0.1 and values[row, "time_per_50_steps"] > 0
    assert values["Faster-RCNN/None", "train_memory_ratio"] == 1.0
    assert values["PSPNet/OREPA", "train_memory_ratio"] > 1.0  # OREPA trains through its branches' kernels
    assert ("PSPNet/OREPA", "time_per_50_steps_ratio") in values and ("PSPNet/OREPA", "top1") not in values
    assert values["Faster-RCNN/None", "top1"] == 71.25  # the lineage: the classification run's top-1
    inputs = db_rows(db, "SELECT r.row_name, a.sha256 FROM artifacts a JOIN runs r ON a.run_id = r.id "
                         "WHERE a.kind = 'input_weights'")
    assert inputs == [("Faster-RCNN/None", sha256_of(ckpt))]

    done = run_cli("report", "table5", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out" / "orepa.table5.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| Faster-RCNN/None | finished | – | 71.2"))
    assert "| 36.5 | 0" in line  # the lineage's top-1, then the measured mAP beside the printed 36.5
    line = next(line for line in md.splitlines() if line.startswith("| PSPNet/OREPA | finished | 12.3 |"))
    assert "GiB" in line and "| 0.41 |" in line  # printed memory and time beside the measured
    assert "| 77.59 |" in md and "| 5.7 |" in md  # rows not run still show their printed values
    assert f"weights from orepa.table4 / ResNet-50/None seed 0 (run 1, train form), sha256 " \
           f"{sha256_of(ckpt)[:12]}" in md
    assert "Deployed after training" in md and "(equal)" in md and "DIFFERENT" not in md


def test_finetune_stores_a_run_with_its_lineage_and_the_report_shows_it(tmp_path):
    """``run_suite finetune`` on the tiny COCO set with a checkpoint from outside the database, trained by two
    processes (DDP over gloo): one run of the ``repbench.finetune`` table (scale mini: a shortened schedule), the
    file's sha256 as its input, the model deployed and evaluated again; ``run_suite report finetune`` shows the row and where its weights came from. A
    second identical call has nothing to do."""
    ensure_tiny_coco(tmp_path / "data")
    ckpt = save_checkpoint(build_classifier("resnet50", "orepa", num_classes=10), tmp_path / "mine.pth")
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    argv = ("finetune", "mmdet/retinanet_repbench-orepa-r50_fpn_1x_coco.py", "--backbone", "resnet50:orepa",
            "--pretrained", str(ckpt), "--data-root", str(tmp_path / "data"), "--iters", "1", "--batch", "2",
            "--image-scale", "96,64", "--devices", "2", "--db", db, "--artifacts", str(tmp_path / "art"))
    done = run_cli(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    row = "retinanet_repbench-orepa-r50_fpn_1x_coco/resnet50:orepa"
    assert db_rows(tmp_path / "db.sqlite", "SELECT table_name, row_name, scale, status FROM runs") == [
        ("repbench.finetune", row, "mini", "finished")]
    params = dict(db_rows(tmp_path / "db.sqlite", "SELECT key, value FROM params"))
    assert (params["world_size"], params["global_batch"], params["grad_accum"]) == ("2", "4", "1")
    assert params["pretrained.sha256"] == f'"{sha256_of(ckpt)}"'
    names = {name for (name,) in db_rows(tmp_path / "db.sqlite", "SELECT name FROM metrics")}
    assert {"map", "map_deployed", "train_memory", "time_per_50_steps"} <= names
    again = run_cli(*argv, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    done = run_cli("report", "finetune", "--db", db, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out" / "repbench.finetune.md").read_text()
    assert f"| {row} | finished |" in md
    assert f"weights from the file {ckpt.resolve()}, sha256 {sha256_of(ckpt)[:12]}" in md


def test_dense_recipes_and_tables_are_checked():
    """A dense table takes DenseRecipes and rows that name their config; bad settings are refused."""
    table = suites.get_table("orepa.table5")
    with pytest.raises(ValueError, match="DenseRecipes"):
        suites.Table("x", "t", "t", "s", ("map",), table.rows, {"smoke": suites.get_table("table4").recipes["smoke"]},
                     runner="dense")
    with pytest.raises(ValueError, match="names its mm config"):
        suites.Table("x", "t", "t", "s", ("map",), (suites.Row("a", "resnet50", "none"),), table.recipes,
                     runner="dense")
    with pytest.raises(ValueError, match="unknown dense data"):
        suites.DenseRecipe(data="imagenet")
    with pytest.raises(ValueError, match="freeze"):
        suites.Row("a", "resnet50", "none", freeze="some")


def test_paper_dry_run_shows_the_stock_batch_and_what_is_missing(tmp_path, monkeypatch, capsys):
    """orepa.table5 at paper scale, dry run, nothing on disk: the plan keeps the global batch on one device by
    accumulation — the supplement's 4 images per GPU at mmdet 1x's total 16 (1 x 4 x 4), mmseg 4xb2's 8 (1 x 4 x 2)
    — at the supplement's lr 0.02 (both stock configs say 0.01 but Faster R-CNN's 0.02), and says as a note which
    classification run a row's backbone needs first; nothing is written. Two devices halve the accumulation; three
    cannot keep the batch (exit 2, one line)."""
    from runners.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REPBENCH_DB", raising=False)
    monkeypatch.setenv("REPBENCH_DATA", str(tmp_path / "data"))
    from runners.jobs import plan
    assert main(["table5", "--scale", "paper", "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 x 4 x 4 = 16" in out and "1 x 4 x 2 = 8" in out
    assert "note: orepa.table5 / Faster-RCNN/None starts from the final weights of a paper-scale classification run " \
           "of resnet50/none" in out and "run_suite orepa.table" in out
    table = suites.get_table("orepa.table5")
    for devices, det, seg in ((1, 4, 4), (2, 2, 2)):
        jobs = {job.spec.row_name: job.config for job in plan(table, "paper", 1, None, "data", "sqlite://",
                                                                  devices=devices)}
        assert [(jobs[r]["grad_accum"], jobs[r]["per_device_batch"], jobs[r]["global_batch"], jobs[r]["lr"])
                for r in ("RetinaNet/OREPA", "DeepLabV3+/DBB")] == [(det, 4, 16, 0.02), (seg, 2, 8, 0.02)]
        assert jobs["PSPNet/None"]["dense"]["cfg_options"]["param_scheduler.0.eta_min"] == 2e-4
    from runners.dense import run_config
    planned = {job.spec.row_name: job for job in plan(table, "paper", 1, None, "data", "sqlite://")}
    seg = run_config(planned["PSPNet/OREPA"], planned["PSPNet/OREPA"].config, tmp_path, tmp_path / "w", None)
    det = run_config(planned["RetinaNet/DBB"], planned["RetinaNet/DBB"].config, tmp_path, tmp_path / "w", None)
    assert seg.param_scheduler[0].eta_min == 2e-4 and seg.optim_wrapper.optimizer.lr == 0.02
    assert det.train_dataloader.batch_size == 4 and det.optim_wrapper.optimizer.lr == 0.02
    assert det.optim_wrapper.accumulative_counts == 4 and seg.optim_wrapper.accumulative_counts == 4
    assert main(["table5", "--scale", "paper", "--dry-run", "--devices", "3"]) == 2
    assert "valid counts: 1, 2, 4" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()
