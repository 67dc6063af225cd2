"""RepOptimizers through the suite: the RepOptimizer trained by MMEngine's Runner (the path every accuracy run takes)
equals CSLA trained by plain SGD; Hyper-Search runs write the scales files that RepOpt rows consume, with the lineage
in the database and in the report; the tables' declarations."""

import json
import sqlite3

import pytest
import torch

import suites
from backbones.networks import RepVGG
from backbones.repopt import BlockScales, csla_blocks, set_constants, target_blocks
from backbones.variants import resolve_variant
from conftest import randomize
from runners.train import optim_wrapper_cfg, train_classifier
from suites import Recipe, Scales

# The synthetic data's 4 classes; strides leaving a 4x4 last map (a 1x1 map would make BN over two images divide by
# a near-zero spread, which amplifies float32 rounding past any useful tolerance).
ARCH = dict(layers=(1, 2, 2, 1), widths=(0.25, 0.25, 0.25, 0.25), num_classes=4, strides=(1, 2, 2, 2, 1))
# Three optimizer steps of 2 devices x 2 images (one process accumulating two micro-batches): momentum, Nesterov and
# weight decay all act. Every CSLA parameter outside BN is decayed (decay_1d: the identity scale d too), so that the
# decay is linear in the equivalent kernel as well.
RECIPE = Recipe(dataset="synthetic", resolution=32, batch=2, devices=2, epochs=1, max_iters=3, lr=0.02,
                nesterov=True, weight_decay=1e-3, bias_lr_mult=1.0, checkpoints=False)


def _csla_and_its_target():
    """A CSLA net with randomised constants and BN, and the RepOpt target standing for it: each kernel the CSLA
    block's equivalent (pre-BN) kernel, its constants the block's, the same BN and head."""
    torch.manual_seed(0)
    csla = randomize(RepVGG(config=resolve_variant("csla"), **ARCH))
    target = RepVGG(config=resolve_variant("repopt"), **ARCH)
    with torch.no_grad():
        for c, t in zip(csla_blocks(csla), target_blocks(target), strict=True):
            t.conv.weight.copy_(c.linear_kernel())
            t.bn.load_state_dict(c.bn.state_dict())
            set_constants(t, BlockScales(c.scale_conv, c.scale_1x1, c.scale_identity))
        target.fc.load_state_dict(csla.fc.state_dict())
    return csla, target


def _logits(model, x):
    return model.eval()(x).detach()


@pytest.mark.parametrize("repoptimizer", [True, False], ids=["repoptimizer", "control:plain-sgd"])
def test_the_runner_trains_a_repopt_target_as_plain_sgd_trains_its_csla_net(repoptimizer, tmp_path):
    """Both nets through train_classifier (MMEngine's Runner, paramwise rules, accumulation, the recipe's schedule)
    on the same data: with the RepOptimizer the target ends where the CSLA net ends (float32: relative error of the
    logits <= 1e-4); the control, the target under plain SGD, does not (> 1e-3), so the Runner really applies the
    Grad Mults."""
    csla, target = _csla_and_its_target()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before = _logits(csla, x), _logits(target, x)
    assert ((before[0] - before[1]).abs().max() / before[0].abs().max()) <= 1e-5  # they start as one function
    train_classifier(csla, RECIPE, tmp_path, seed=0, grad_accum=2)
    train_classifier(target, RECIPE, tmp_path, seed=0, grad_accum=2, repoptimizer=repoptimizer)
    a, b = _logits(csla, x), _logits(target, x)
    moved = ((a - before[0]).abs().max() / a.abs().max()).item()
    error = ((a - b).abs().max() / a.abs().max()).item()
    assert moved > 1e-2  # training did change the function
    assert (error <= 1e-4) if repoptimizer else (error > 1e-3), (error, moved)


def test_the_repoptimizer_config_refuses_clipping_and_decays_no_flat_parameter_when_told():
    recipe = suites.get_table("repopt.table2").recipes["mini"]
    cfg = optim_wrapper_cfg(recipe, 2, repoptimizer=True)
    assert cfg["optimizer"]["type"] == "repbench.RepOptimizerSGD"
    assert cfg["constructor"] == "repbench.RepOptimizerConstructor" and "clip_grad" not in cfg
    assert cfg["paramwise_cfg"]["flat_decay_mult"] == 0.0 and cfg["accumulative_counts"] == 2
    assert "flat_decay_mult" not in optim_wrapper_cfg(suites.get_table("table4").recipes["mini"])["paramwise_cfg"]
    from mmengine.optim import build_optim_wrapper
    with pytest.raises(ValueError, match="gradient clipping breaks"):
        build_optim_wrapper(RepVGG(config=resolve_variant("repopt"), **ARCH),
                            {**cfg, "clip_grad": dict(max_norm=5.0)})


def test_repopt_tables_are_declared_as_printed():
    hs, t2, t4 = (suites.get_table(f"repopt.{n}") for n in ("hs", "table2", "table4"))
    row = t2.row("RepOpt-VGG-B1")
    assert row.rep == "repopt" and row.scales == Scales("repopt.hs", "RepOpt-VGG-B1 HS")
    assert row.paper["top1"].text == "78.47±0.03" and row.paper["train_speed"].text == "380"
    assert t2.row("RepVGG-L2").paper["top1"].text == "80.52±0.05" and t2.baseline_of(row) == "RepVGG-B1"
    assert {r.scales.how for r in t4.rows if r.scales} == {"searched", "ones", "hs_init", "channel_mean"}
    assert [r.paper["top1"].text for r in t4.rows if r.paper] == [
        "76.91", "76.72", "76.14", "75.03", "74.69", "78.47", "77.42", "77.07", "77.59", "77.71", "77.40"]
    assert [r.optimizer for r in t4.rows[:5]] == [None, "rmsprop", "adam", "adamw", "adafactor"]
    ours = t4.row("RepOptimizer (AdamW, ours) / Hyper-Search / init+grad")  # not in the paper: no printed value
    assert not ours.paper and ours.optimizer == "adamw" and ours.scales.grad_mult
    for table in (t2, t4):  # one recipe per table, and never clipping where a RepOptimizer trains
        assert all(r.clip_grad is None for r in table.recipes.values())
    assert hs.recipes["paper"].dataset == "cifar100" and hs.recipes["mini"].dataset == "digits_cifar"
    t6, t9 = suites.get_table("repopt.table6"), suites.get_table("repopt.table9")
    assert [(r.paper["top1"].text, hs.row(r.scales.row).variant) for r in t6.rows] == [
        ("78.47", None), ("77.81", {"strides": (2, 2, 1, 2, 1)}), ("77.88", {"strides": (2, 1, 2, 1, 1)})]
    assert [hs.row(r.scales.row).paper["top1"].text for r in t6.rows] == ["54.53", "70.66", "74.37"]
    assert [(r.paper["top1"].text, hs.row(r.scales.row).paper["top1"].text) for r in t9.rows] == [
        ("77.59", "47.70"), ("78.47", "54.53")]
    maxbs = suites.get_table("repopt.table2_maxbs")
    row = maxbs.row("RepOpt-VGG-B1 @MaxBS 260")  # trained and timed at the printed MaxBS, lr scaled linearly
    paper = maxbs.recipe("paper", row)
    assert (paper.batch, paper.global_batch, paper.lr, paper.cost_batch) == (260, 2080, 0.1 * 260 / 32, 260)
    assert row.paper["top1"].text == "78.62±0.03" and row.paper["train_speed"].text == "445" and not maxbs.baselines
    assert maxbs.recipe("mini", maxbs.row("RepVGG-L2 @MaxBS 77")).batch == 77
    t3, t5 = suites.get_table("repopt.table3"), suites.get_table("repopt.table5")
    b4 = t3.recipe("paper", t3.row("EfficientNet-B4"))
    assert (b4.epochs, b4.resolution, b4.test_resolution, b4.throughput_batch) == (300, 380, 380, 64)
    dagger = t3.row("RepOpt-VGG-L2†")
    d = t3.recipe("paper", dagger)
    assert (d.epochs, d.resolution, d.test_resolution, d.cost_resolution) == (200, 224, 320, 320)
    assert dagger.variant == {"se": True} and dagger.scales.row == "RepOpt-VGG-L2 HS"
    assert t3.row("EfficientNet-B2").paper["top1"].text == "76.29 (79.8)" and t3.recipe("smoke", dagger).epochs == 1
    assert [(r.paper["top1"].text, t5.recipe("paper", r).dataset, hs.recipe("paper", hs.row(r.scales.row)).dataset)
            for r in t5.rows] == [
        ("78.47", "imagenet", "cifar100"), ("78.43", "imagenet", "imagenet"), ("78.19", "imagenet", "caltech256"),
        ("67.46", "caltech256", "cifar100"), ("67.55", "caltech256", "imagenet"),
        ("67.42", "caltech256", "caltech256")]
    caltech = t5.recipe("paper", t5.rows[-1])  # "the same settings as CIFAR-100" (no clipping: a RepOpt target)
    assert (caltech.epochs, caltech.lr, caltech.warmup_epochs, caltech.clip_grad) == (240, 0.1, 10.0, None)
    assert hs.recipe("paper", hs.row("RepOpt-VGG-B1 HS on ImageNet")) == suites.get_table("repopt.table2").recipes[
        "paper"]  # ImageNet search = ImageNet training settings
    declared = {k: t for k, t in suites.TABLES.items() if k.startswith("repopt.") and not t.recipes}
    assert set(declared) == {"repopt.table12"}
    t7 = suites.get_table("repopt.table7")  # dense: one row per (model, backbone), the printed values split
    assert t7.runner == "dense" and [(r.name, r.rep, *(v.text for v in r.paper.values())) for r in t7.rows] == [
        ("Cascade Mask R-CNN/RepOpt-VGG-B1", "repopt", "43.50"), ("Cascade Mask R-CNN/RepVGG-B1", "repvgg", "43.60"),
        ("UperNet/RepOpt-VGG-B1", "repopt", "79.36"), ("UperNet/RepVGG-B1", "repvgg", "79.15")]
    assert suites.get_table("repopt.table10").row("RepVGG-1").paper["top1_qat"].text == "N/A"
    assert suites.get_table("repopt.table11").row("RepVGG-B1 / after branch addition").paper[
        "kernel_std_central"].text == "0.0500"
    for table in [*declared.values(), *(suites.get_table(f"repopt.table{n}") for n in (8, 10, 11))]:
        # every printed value belongs to one of the table's columns
        assert all(set(r.paper) <= set(table.metrics) for r in table.rows), table.key
    with pytest.raises(ValueError, match="need"):
        Scales(how="searched")
    with pytest.raises(ValueError, match="take no"):
        Scales("repopt.hs", "RepOpt-VGG-B1 HS", how="ones")


def test_generated_cifar_data_is_read_by_the_cifar_reader(tmp_path):
    from runners.data import build_datasets
    train, val = build_datasets("synthetic_cifar", tmp_path, 32)
    assert (tmp_path / "synthetic_cifar" / "train").is_file() and (tmp_path / "synthetic_cifar" / "test").is_file()
    assert type(train).__name__ == "CifarPickles" and len(train) == 8 and len(val) == 8
    image, label = train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 4


def test_a_repopt_row_runs_its_hyper_search_first_and_records_where_its_scales_came_from(tmp_path):
    """run_suite repopt.table2 --only RepOpt-VGG-B1 at smoke: the Hyper-Search run is planned and run first, writes a
    scales file; the RepOpt run consumes that very file (same sha256, recorded as its input) and the report names
    the Hyper-Search run beside the row."""
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    done = run_cli("repopt.table2", "--only", "RepOpt-VGG-B1", "--db", f"sqlite:///{db}", "--data-root",
                   str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.index("RepOpt-VGG-B1 HS (seed 0): finished") < done.stdout.index("RepOpt-VGG-B1 (seed 0): fin")
    with sqlite3.connect(db) as c:
        runs = dict(c.execute("SELECT row_name, id FROM runs").fetchall())
        files = {(run, kind): sha for run, kind, sha in c.execute("SELECT run_id, kind, sha256 FROM artifacts")}
        speed = c.execute("SELECT value FROM metrics WHERE name = 'train_speed_ratio' AND run_id = ?",
                          (runs["RepOpt-VGG-B1"],)).fetchall()
    assert set(runs) == {"RepOpt-VGG-B1 HS", "RepOpt-VGG-B1"}
    assert files[(runs["RepOpt-VGG-B1"], "input_scales")] == files[(runs["RepOpt-VGG-B1 HS"], "scales")]
    assert len(speed) == 1 and speed[0][0] > 0
    report = run_cli("report", "repopt.table2", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"),
                     cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "out" / "repopt.table2.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("| RepOpt-VGG-B1 | finished | 1 |"))
    assert f"scales from repopt.hs / RepOpt-VGG-B1 HS seed 0 (run {runs['RepOpt-VGG-B1 HS']})" in line


def test_paper_plan_of_table2_runs_each_hyper_search_once_before_its_rows(tmp_path, monkeypatch, capsys):
    """The paper-scale plan (no data on disk: a note): the official target recipe (8 x 32, lr 0.1, 120 epochs,
    warm-up 5 epochs, no 1-D parameter decayed, Nesterov), and one Hyper-Search run per size planned with the rows that
    use it, ahead of them."""
    from runners.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPBENCH_DATA", str(tmp_path / "data"))
    assert main(["repopt.table2", "--scale", "paper", "--dry-run", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "devices 1 (paper: 8)" in flat and "global batch 256" in flat and "lr 0.1" in flat
    assert "120 epoch(s)" in flat and "warmup: 5 epochs" in flat and "no 1-D parameter decayed" in flat
    assert "nesterov: True" in flat and "note: imagenet not found" in flat and "20 of 20 runs to do" in flat
    from runners.jobs import plan
    jobs = plan(suites.get_table("repopt.table2"), "paper", 2, None, str(tmp_path / "data"), "sqlite://")
    for size in ("B1", "B2", "L1", "L2"):  # per arch: its one HS run, then its target's seeds
        reps = [job.config["rep"] for job in jobs if job.config["arch"] == f"repoptvgg_{size.lower()}"]
        assert [r for r in reps if r != "repvgg"] == ["hs", "repopt", "repopt"], (size, reps)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("name,cls", [("rmsprop", "RMSprop"), ("adam", "Adam"), ("adamw", "AdamW"),
                                      ("adafactor", "Adafactor")])
def test_a_row_names_its_optimizer(name, cls):
    """Table 4's adaptive optimizers through MMEngine: torch's class, the recipe's adaptive lr and weight decay (none
    on BN), and no RepOptimizer mixed in."""
    from mmengine.optim import build_optim_wrapper
    recipe = suites.get_table("repopt.table4").recipes["mini"]
    model = RepVGG(config=resolve_variant("none"), **ARCH)
    wrapper = build_optim_wrapper(model, optim_wrapper_cfg(recipe, 1, optimizer=name))
    optimizer = wrapper.optimizer
    assert type(optimizer).__name__ == cls and optimizer.defaults["lr"] == recipe.adaptive_lr
    decays = {group["weight_decay"] for group in optimizer.param_groups}
    assert decays == {0.0, recipe.weight_decay}
    if name == "adamw":  # the RepOptimizer's AdamW form: Grad Mults of power 1 from the model's RepOpt blocks
        from backbones.repopt import reinitialize, scales_of
        target = RepVGG(config=resolve_variant("repopt"), **ARCH)
        reinitialize(target, scales_of(RepVGG(config=resolve_variant("hs"), **ARCH)))
        rep = build_optim_wrapper(target, optim_wrapper_cfg(recipe, 1, repoptimizer=True, optimizer=name)).optimizer
        assert type(rep).__name__ == "RepOptimizerAdamW" and rep.power == 1 and rep.grad_mults
        assert rep.defaults["lr"] == recipe.adaptive_lr
    else:
        with pytest.raises(ValueError, match="SGD or AdamW"):
            optim_wrapper_cfg(recipe, 1, repoptimizer=True, optimizer=name)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim_wrapper_cfg(recipe, 1, optimizer="lamb")


def test_a_row_that_contradicts_itself_fails_at_its_declaration():
    """A bad row is a ValueError where the table is written (import time), not when a plan meets it."""
    from suites import Row, Scales
    with pytest.raises(ValueError, match="say where their scales"):
        Row("x", "repoptvgg_b1", "repopt")
    with pytest.raises(ValueError, match="say where their scales"):
        Row("x", "repoptvgg_b1", "repvgg", scales=Scales(how="ones"))
    with pytest.raises(ValueError, match="unknown optimizer"):
        Row("x", "repoptvgg_b1", "none", optimizer="lamb")
    with pytest.raises(ValueError, match="SGD or AdamW"):
        Row("x", "repoptvgg_b1", "repopt", scales=Scales(how="ones"), optimizer="adam")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        Row("x", "repoptvgg_b1", "none", recipe={"mini": {"learning_rate": 1.0}})
    Row("x", "repoptvgg_b1", "repopt", scales=Scales(how="ones", grad_mult=False), optimizer="adam")  # plain Adam


def test_hs_variants_build_the_stride_and_initialisation_models_of_tables_6_and_9():
    """Table 6's strides and Table 9's all-1 initialisation are recorded variants of the HS model: the strides reach
    the network (a stride-1 stem keeps the resolution), the all-1 scales reach every block, and the scales of every
    variant fit the original target (same blocks, same identity placement)."""
    from backbones import build_classifier
    from backbones.repopt import reinitialize, scales_of
    hs = suites.get_table("repopt.hs")
    x = torch.randn(1, 3, 64, 64)
    sizes = {}
    for row in hs.rows[:4]:
        model = build_classifier(row.arch, row.rep, 10, row.variant).eval()
        sizes[row.name] = model.forward_features(x)[-1].shape[-1]
        target = build_classifier(row.arch, "repopt", 10)
        reinitialize(target, scales_of(model))  # raises on any block mismatch
    assert sizes == {"RepOpt-VGG-B1 HS": 2, "RepOpt-VGG-B1 HS strides 2,2,1,2,1": 8,
                     "RepOpt-VGG-B1 HS strides 2,1,2,1,1": 16, "RepOpt-VGG-B1 HS all-1 init": 2}
    ones = build_classifier("repoptvgg_b1", "hs", 10, {"hs_init": "ones"})
    assert all(bool((b.scale_conv == 1).all()) for b in csla_blocks(ones))
    code = build_classifier("repoptvgg_b1", "hs", 10)
    assert not all(bool((b.scale_conv == 1).all()) for b in csla_blocks(code))


def test_a_scales_file_replaces_the_hyper_search_and_is_recorded(tmp_path, monkeypatch, capsys):
    """run_suite --scales FILE: RepOpt rows use the file (no Hyper-Search run is planned), its sha256 is part of the
    run key and the run records it as its input; a missing or unreadable file, or a table without RepOpt rows, is bad
    input (exit 2, nothing written)."""
    from backbones import build_classifier
    from backbones.repopt import save_scales, scales_of
    from runners.cli import main
    from test_cli import run_cli
    monkeypatch.chdir(tmp_path)
    file = save_scales(scales_of(build_classifier("repoptvgg_b1", "hs", 4)), tmp_path / "b1-scales.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for argv, message in ((["repopt.table9", "--scales", "nope.pth"], "--scales nope.pth"),
                          (["repopt.table9", "--scales", "junk.pth"], "--scales junk.pth"),
                          (["table4", "--scales", str(file)], "has no RepOpt row")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) <= 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b1-scales.pth", "junk.pth"]
    db = tmp_path / "r.sqlite"
    done = run_cli("repopt.table9", "--only", "sqrt(2/l)", "--scales", str(file), "--db", f"sqlite:///{db}",
                   "--data-root", str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        runs = c.execute("SELECT table_name, row_name FROM runs").fetchall()
        used = c.execute("SELECT kind, path, sha256 FROM artifacts WHERE kind = 'input_scales'").fetchall()
        keys = dict(c.execute("SELECT key, value FROM params").fetchall())
    from runners.train import sha256_of
    assert runs == [("repopt.table9", "sqrt(2/l)")]  # no Hyper-Search run
    assert used == [("input_scales", str(file), sha256_of(file))]
    assert json.loads(keys["scales.file_sha256"]) == sha256_of(file) and json.loads(keys["scales.row"]) is None


def test_table1_counts_the_deployed_models_with_imagenet_heads(tmp_path):
    """repopt.table1 trains nothing: its runs count parameters and MACs of the deployed RepOpt-VGG with a 1000-class
    head (whatever the scale's data), exact integers that, truncated to 0.1 M as the paper prints, equal Table 1;
    the report puts the printed counts beside them."""
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    done = run_cli("repopt.table1", "--only", "RepOpt-VGG-B1", "--db", f"sqlite:///{db}", "--data-root",
                   str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        values = dict(c.execute("SELECT name, value FROM metrics").fetchall())
    assert "top1" not in values and int(values["params_deploy"]) // 100_000 == 518
    from backbones import build_classifier, deploy
    from runners.probes import count_macs, count_params
    model = deploy(build_classifier("repoptvgg_b1", "repopt", 1000).eval())
    assert values["params_deploy"] == count_params(model) and values["macs_deploy"] == count_macs(model, 224)
    assert run_cli("report", "repopt.table1", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"),
                   cwd=tmp_path).returncode == 0
    text = (tmp_path / "out" / "repopt.table1.md").read_text()
    assert "| RepOpt-VGG-B1 | 51.84M | 51.8 M | 51.83M | 11.82G | 11.9 B | 11.82G |" in text


def test_table4_smoke_runs_every_optimizer_and_ablation(tmp_path):
    """repopt.table4 at smoke: every row finishes; one Hyper-Search run serves the four rows that read its scales
    (searched, grad only, init only, channel mean), recorded as their input; the constant rows (all 1, HS init) and
    the plain optimizers read none; each run records the rules and the optimizer it used."""
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    done = run_cli("repopt.table4", "--db", f"sqlite:///{db}", "--data-root", str(tmp_path / "data"),
                   "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        runs = dict(c.execute("SELECT row_name, status FROM runs").fetchall())
        inputs = {row for (row,) in c.execute("SELECT row_name FROM artifacts JOIN runs ON runs.id = run_id "
                                              "WHERE kind = 'input_scales'")}
        params = {(row, key): json.loads(value) for row, key, value in c.execute(
            "SELECT row_name, key, value FROM params JOIN runs ON runs.id = run_id")}
    table = suites.get_table("repopt.table4")
    assert runs == {**{r.name: "finished" for r in table.rows}, "RepOpt-VGG-B1 HS": "finished"}
    assert inputs == {r.name for r in table.rows if r.scales and r.scales.how in ("searched", "channel_mean")}
    assert params[("RepOptimizer / Hyper-Search / grad only", "scales.reinit")] is False
    assert params[("RepOptimizer / Hyper-Search / init only", "scales.grad_mult")] is False
    assert params[("Adafactor", "optimizer")] == "adafactor" and ("SGD", "optimizer") not in params
    ours = "RepOptimizer (AdamW, ours) / Hyper-Search / init+grad"  # the RepOptimizer's AdamW form
    assert params[(ours, "optimizer")] == "adamw" and params[(ours, "scales.grad_mult")] is True


def test_table3_smoke_measures_a_torchvision_row_beside_its_printed_values(tmp_path):
    """repopt.table3 at smoke, its EfficientNet-B2 row (torchvision's model): trained one step, its deployed form
    counted and timed (throughput at the recipe's throughput batch), the printed values beside them."""
    from test_cli import run_cli
    from backbones import build_classifier, deploy
    from runners.probes import count_params
    db = tmp_path / "r.sqlite"
    done = run_cli("repopt.table3", "--only", "EfficientNet-B2", "--db", f"sqlite:///{db}", "--data-root",
                   str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        values = {name: (value, batch) for name, value, batch in c.execute("SELECT name, value, batch FROM metrics")}
    recipe = suites.get_table("repopt.table3").recipes["smoke"]
    assert values["throughput"][0] > 0 and values["throughput"][1] == recipe.throughput_batch
    assert values["params_deploy"][0] == count_params(deploy(build_classifier("efficientnet_b2", "none", 4)))
    assert "top1" in values
    assert run_cli("report", "repopt.table3", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"),
                   cwd=tmp_path).returncode == 0
    text = (tmp_path / "out" / "repopt.table3.md").read_text()
    assert "| EfficientNet-B2 | finished | 76.29 (79.8) |" in text and "| RepOpt-VGG-L2† | not run | 83.13 |" in text


def test_table5_searches_on_another_dataset_and_its_target_reads_that_search(tmp_path):
    """repopt.table5 at smoke, its Caltech256-searched Caltech256 row: the Hyper-Search row "on Caltech256" (a recipe
    of its own: ImageFolder data, no CIFAR pickles) runs first and its scales are the target's recorded input; the
    Hyper-Search report names what that row's recipe changes."""
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    row = "Caltech256 / searched on Caltech256"
    done = run_cli("repopt.table5", "--only", row, "--db", f"sqlite:///{db}", "--data-root", str(tmp_path / "data"),
                   "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        runs = dict(c.execute("SELECT row_name, id FROM runs").fetchall())
        files = {(run, kind): sha for run, kind, sha in c.execute("SELECT run_id, kind, sha256 FROM artifacts")}
        datasets = dict(c.execute("SELECT row_name, value FROM params JOIN runs ON runs.id = run_id "
                                  "WHERE key = 'recipe.dataset'").fetchall())
    assert set(runs) == {"RepOpt-VGG-B1 HS on Caltech256", row}
    assert files[(runs[row], "input_scales")] == files[(runs["RepOpt-VGG-B1 HS on Caltech256"], "scales")]
    assert {json.loads(v) for v in datasets.values()} == {"synthetic"}  # smoke: the generated ImageFolder
    assert not (tmp_path / "data" / "synthetic_cifar").exists()
    assert run_cli("report", "repopt.hs", "--db", f"sqlite:///{db}", "--out", str(tmp_path / "out"),
                   cwd=tmp_path).returncode == 0
    text = (tmp_path / "out" / "repopt.hs.md").read_text()
    assert "Rows with a recipe of their own: RepOpt-VGG-B1 HS on ImageNet: dataset synthetic" in text
    # at paper scale the search and the target read <data-root>/caltech256: without it, one line and exit 2
    missing = run_cli("repopt.table5", "--scale", "paper", "--only", row, "--data-root", str(tmp_path / "data"),
                      "--db", f"sqlite:///{tmp_path / 'p.sqlite'}", cwd=tmp_path)
    assert missing.returncode == 2 and "caltech256 not found" in missing.stderr
    assert not (tmp_path / "p.sqlite").exists()


def test_caltech256_is_an_imagefolder_evaluated_at_its_own_resolution(tmp_path):
    """<data-root>/caltech256/{train,val}: read as ImageNet is (random resized crop for training; resize and centre
    crop for evaluation, at the recipe's test resolution when it has one)."""
    from PIL import Image
    from runners.data import DatasetMissing, build_datasets
    with pytest.raises(DatasetMissing, match="caltech256 not found"):
        build_datasets("caltech256", tmp_path, 32)
    for split in ("train", "val"):
        for label in ("001.ak47", "257.clutter"):
            (tmp_path / "caltech256" / split / label).mkdir(parents=True)
            Image.new("L", (90, 60), 128).save(tmp_path / "caltech256" / split / label / "0001.jpg")  # grey
    train, val = build_datasets("caltech256", tmp_path, 32, eval_resolution=48)
    assert train.classes == ["001.ak47", "257.clutter"] and len(val) == 2
    assert train[0][0].shape == (3, 32, 32) and val[0][0].shape == (3, 48, 48)
    from torchvision.transforms import RandAugment
    augmented, _ = build_datasets("caltech256", tmp_path, 32, randaugment=15)  # the RepOpt target's paper recipe
    (op,) = [t for t in augmented.transform.transforms if isinstance(t, RandAugment)]
    assert (op.num_ops, op.magnitude, op.num_magnitude_bins) == (2, 15, 31) and augmented[1][0].shape == (3, 32, 32)
    assert not any(isinstance(t, RandAugment) for t in train.transform.transforms)


def test_mini_uses_the_papers_own_data_where_the_data_root_holds_it(tmp_path, monkeypatch, capsys):
    """At mini a table whose paper data is CIFAR-100 (Hyper-Search) trains on it when --data-root holds it (here
    CIFAR-100 pickles in the real layout), the mini recipe otherwise unchanged; ImageNet is absent, so the targets
    keep the digits stand-in. The plan says which data each run reads."""
    import shutil
    from runners.cli import main
    from runners.data import ensure_cifar_copy
    root = tmp_path / "data"
    shutil.copytree(ensure_cifar_copy("digits_cifar", root), root / "cifar-100-python")
    monkeypatch.chdir(tmp_path)
    assert main(["repopt.table2", "--scale", "mini", "--only", "RepOpt-VGG-B1", "--dry-run", "--seeds", "1",
                 "--data-root", str(root)]) == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines() if "RepOpt-VGG-" in line]
    assert "│ cifar100" in lines[0] and "│ 3905 │" in lines[0] and "│ digits 32px │" in lines[-1]  # 5 x 50000 / 64
    from runners.jobs import plan
    hs, target = plan(suites.get_table("repopt.table2"), "mini", 1, ["RepOpt-VGG-B1"], str(root), "sqlite://")
    assert hs.config["recipe"]["dataset"] == "cifar100" and hs.config["num_classes"] == 100
    assert hs.config["recipe"]["epochs"] == 5 and target.config["recipe"]["dataset"] == "digits"
    assert not (tmp_path / "results").exists()


def test_table2_maxbs_smoke_trains_and_times_a_row_at_its_own_batch(tmp_path):
    """repopt.table2_maxbs at smoke: the row trains and its train speed is timed (no baseline: each row at its own
    batch); the report lists what the row's recipe changes at the scales where it differs."""
    from test_cli import run_cli
    db = tmp_path / "r.sqlite"
    done = run_cli("repopt.table2_maxbs", "--only", "RepVGG-B1 @MaxBS 198", "--db", f"sqlite:///{db}", "--data-root",
                   str(tmp_path / "data"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(db) as c:
        names = {name for (name,) in c.execute("SELECT name FROM metrics")}
    assert {"top1", "train_speed"} <= names and "train_speed_ratio" not in names
    plan = run_cli("repopt.table2_maxbs", "--scale", "mini", "--only", "RepOpt-VGG-B1 @MaxBS 260", "--dry-run",
                   "--data-root", str(tmp_path / "data"), cwd=tmp_path)
    target = [line for line in plan.stdout.splitlines() if "│ 520, 0.1625 " in line]  # 2 x 260, 0.02 x 260 / 32
    assert plan.returncode == 0 and len(target) == 3, plan.stdout
