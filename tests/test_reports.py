"""Reports are computed from the store alone: paper value, mean ± std over seeds, deltas only at the paper scale,
verdicts, cost ratios against the group's baseline with their spread, the papers' claims judged, size and inference
columns, OOM and failures; every user-controlled string escaped, in markdown as in HTML; the HTML site."""

import dataclasses
import re

import pytest

import suites
from reports import build_table_report, render_markdown, render_site
from results import MetricRecord, Store
from runners.jobs import plan


UNITS = {"latency": "s", "throughput": "img/s", "params_train": "params", "params_deploy": "params",
         "macs_train": "MACs", "macs_deploy": "MACs"}  # as runners/probes.py stores them


def fill(store, table, scale, values, status="finished", error=None, methods=None, threads=None):
    """values: row -> list over seeds of {metric: value}; methods: metric -> how it was measured."""
    for job in plan(table, scale, max(len(v) for v in values.values()), list(values), "data", store.url):
        per_seed = values[job.spec.row_name]
        if job.spec.seed >= len(per_seed):
            continue
        run = store.ensure_run(job.spec)
        claim = store.claim(run.id, lease_s=60, pid=1, host="h", executor="local")
        store.log_metrics(run.id, [MetricRecord(k, v, suites.METRICS[k].unit if k in suites.METRICS else UNITS.get(k, "x"),
                                                device="cpu: test", threads=threads,
                                                method=(methods or {}).get(k))
                                   for k, v in per_seed[job.spec.seed].items()], owner=claim.owner)
        store.finish_run(run.id, status, error=error, claim=claim)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/r.sqlite")
    yield s
    s.close()


def cell(section, row, column, family=None):
    family = family or ("Accuracy" if column.startswith(("Top-1", "status")) else "Training cost")
    return next(r for r in section.family(family).rows if r["row"] == row)[column]


def test_accuracy_at_a_small_scale_shows_its_own_numbers_without_deltas(store):
    table = suites.get_table("table1")
    fill(store, table, "smoke", {"DBB-18/Original": [{"top1": 70.0}, {"top1": 72.0}]})
    report = build_table_report(table, store)
    section = report["sections"][0]
    assert cell(section, "DBB-18/Original", "Top-1 acc paper") == "71.77"
    assert cell(section, "DBB-18/Original", "Top-1 acc measured") == "71 ± 1.4 % (n=2)"
    assert section.family("Accuracy").columns == ["row", "status", "Top-1 acc paper", "Top-1 acc measured"]
    assert cell(section, "RepVGG-A0/Original", "status") == "not run"
    assert "-0.77" not in render_markdown(report)


def test_seeds_that_disagree_are_flagged(store):
    table = suites.get_table("table1")
    spread = table.recipes["mini"].seed_spread
    fill(store, table, "mini", {"DBB-18/Original": [{"top1": 90.0}, {"top1": 90.0 + 3 * spread}, {"top1": 90.0}],
                                "DBB-18/W/o re-param": [{"top1": 95.0}, {"top1": 95.0 + spread}, {"top1": 95.0}]})
    section = build_table_report(table, store)["sections"][0]
    assert "seeds disagree" in cell(section, "DBB-18/Original", "Top-1 acc measured")
    assert "seeds disagree" not in cell(section, "DBB-18/W/o re-param", "Top-1 acc measured")


def test_paper_scale_accuracy_verdicts(store):
    table = suites.get_table("table3")
    fill(store, table, "paper", {"ResNet-18/Vector scaling": [{"top1": 72.30}],
                                 "ResNet-18/Scalar scaling": [{"top1": 71.60}],
                                 "ResNet-18/W/o post-addition norm": [{"top1": float("nan")}]})
    section = build_table_report(table, store)["sections"][0]
    assert cell(section, "ResNet-18/Vector scaling", "Top-1 acc delta") == "+0.17"
    assert cell(section, "ResNet-18/Vector scaling", "Top-1 acc reproduced?") == "yes"    # +0.17 within 0.3
    assert cell(section, "ResNet-18/Scalar scaling", "Top-1 acc reproduced?") == "no"     # -0.44
    assert cell(section, "ResNet-18/W/o post-addition norm", "Top-1 acc reproduced?") == "yes"  # NaN as printed


def ratio(value, q1=None, q3=None, name="time_per_batch"):
    """The metrics a run stores for its ratio to the group's baseline (runners/probes.py, compare_costs)."""
    return {f"{name}_ratio": value, f"{name}_ratio_q1": value if q1 is None else q1,
            f"{name}_ratio_q3": value if q3 is None else q3}


def test_cost_ratios_are_the_ones_measured_side_by_side(store):
    """The ratio shown is the one each run measured against its baseline in the same process, with its spread;
    never the quotient of two runs' absolute numbers (here 5.0 / 2.0 would say 2.5x)."""
    table = suites.get_table("table4")
    fill(store, table, "mini", {
        "ResNet-18/None": [{"time_per_batch": 2.0, "train_memory": 1.0, **ratio(1.0), **ratio(1.0, name="train_memory")}],
        "ResNet-18/DBB": [{"time_per_batch": 5.0, "train_memory": 2.5, **ratio(2.9, 2.8, 3.1),
                           **ratio(2.4, name="train_memory")}],
        "ResNet-18/OREPA": [{"time_per_batch": 3.0, "train_memory": 1.2, **ratio(1.5, 1.4, 1.6),
                             **ratio(1.2, name="train_memory")}]})
    section = build_table_report(table, store)["sections"][0]
    # measured 2.9x [2.8-3.1] beside the paper's 0.241/0.086 = 2.80x
    assert cell(section, "ResNet-18/DBB", "Time/batch ratio") == "2.9x [2.8–3.1]"
    assert cell(section, "ResNet-18/DBB", "Time/batch paper ratio") == "2.8x"
    assert cell(section, "ResNet-18/OREPA", "Train memory ratio") == "1.2x"
    assert cell(section, "ResNet-18/None", "Time/batch ratio") == "1x"
    assert cell(section, "ResNet-18/DBB", "Time/batch measured") == "5 s"
    assert cell(section, "ResNet-18/DBB", "Time/batch reproduced?") == "n/a (regime)"
    assert "not judged" in section.regime_note
    assert "measured side by side" in render_markdown(build_table_report(table, store))


def test_cost_ratio_spread_over_seeds(store):
    table = suites.get_table("table4")
    fill(store, table, "mini", {"ResNet-18/DBB": [ratio(2.0, 1.9, 2.2), ratio(3.0, 2.7, 3.3)]})
    section = build_table_report(table, store)["sections"][0]
    assert cell(section, "ResNet-18/DBB", "Time/batch ratio") == "2.5x [1.9–3.3]"


def test_cost_order_verdict_at_the_paper_regime(store):
    table = suites.get_table("table4")
    fill(store, table, "paper", {"ResNet-18/None": [ratio(1.0)], "ResNet-18/DBB": [ratio(2.0)],
                                 "ResNet-18/OREPA": [ratio(3.0)]})  # OREPA slower than DBB: wrong order
    section = build_table_report(table, store)["sections"][0]
    assert cell(section, "ResNet-18/None", "Time/batch reproduced?") == "yes"
    assert cell(section, "ResNet-18/OREPA", "Time/batch reproduced?") == "no"
    assert cell(section, "ResNet-18/DBB", "Time/batch reproduced?") == "no"


def claim_results(section, text):
    return {r["pair"]: r for c in section.claims if c["text"].startswith(text) for r in c["results"]}


@pytest.mark.parametrize("scale", ["paper", "mini"])
def test_the_papers_claims_are_judged_from_the_measured_ratios(store, scale):
    """OREPA Table 4: "saves ~70% of DBB's extra memory, trains 1.5x-2.3x faster". ResNet-18: DBB 1.8x memory and
    2.8x time, OREPA 1.24x and 1.4x: 70% saved, 2.0x faster. ResNet-34: OREPA slower than DBB. At the paper's
    regime a verdict, elsewhere the measured figure only."""
    table = suites.get_table("table4")
    fill(store, table, scale, {
        "ResNet-18/DBB": [{**ratio(1.8, name="train_memory"), **ratio(2.8)}],
        "ResNet-18/OREPA": [{**ratio(1.24, name="train_memory"), **ratio(1.4)}],
        "ResNet-34/DBB": [{**ratio(2.0, name="train_memory"), **ratio(2.0)}],
        "ResNet-34/OREPA": [{**ratio(1.9, name="train_memory"), **ratio(2.5)}]})
    section = build_table_report(table, store)["sections"][0]
    memory, speed = claim_results(section, "OREPA saves"), claim_results(section, "OREPA trains")
    assert memory["ResNet-18/OREPA vs ResNet-18/DBB"]["measured"] == "70%"
    assert memory["ResNet-18/OREPA vs ResNet-18/DBB"]["paper"] == "70%"  # (5.2-4.2)/(7.5-4.2) from Table 4
    assert speed["ResNet-18/OREPA vs ResNet-18/DBB"]["measured"] == "2.00x"
    assert speed["ResNet-34/OREPA vs ResNet-34/DBB"]["measured"] == "0.80x"
    assert set(memory) == set(speed) == {"ResNet-18/OREPA vs ResNet-18/DBB", "ResNet-34/OREPA vs ResNet-34/DBB"}
    verdicts = {pair: r["verdict"] for pair, r in speed.items()}
    if scale == "paper":
        assert verdicts == {"ResNet-18/OREPA vs ResNet-18/DBB": "yes", "ResNet-34/OREPA vs ResNet-34/DBB": "no"}
        assert memory["ResNet-34/OREPA vs ResNet-34/DBB"]["verdict"] == "no"  # 10% saved
    else:
        assert set(verdicts.values()) == {"n/a (regime)"}
    md = render_markdown(build_table_report(table, store))
    assert "| OREPA trains 1.5x-2.3x faster than DBB (OREPA Sec. 4.3) | ResNet-18/OREPA vs ResNet-18/DBB |" in md


def test_oom_failures_size_inference_and_provenance(store):
    table = suites.get_table("fig8")
    oom = "OOM at budget 0.01 GiB; CPU child process (2 thread(s)): VmHWM ..."
    fill(store, table, "smoke", {"Offline/+Linear stem": [{"train_memory": None, "time_per_batch": None}]},
         methods={"train_memory": oom, "time_per_batch": "not timed: " + oom})
    fill(store, table, "smoke", {"Online/Base": [{"train_memory": 0.5, "params_train": 11689512.0,
                                                  "params_deploy": 11689512.0, "macs_deploy": 1.82e9,
                                                  "latency": 0.01, **ratio(1.0, name="latency")}]}, threads=2)
    fill(store, table, "smoke", {"Online/+DBB": [{"train_memory": 1.0}]}, status="failed",
         error="RuntimeError: boom\nTraceback (most recent call last): ...")
    report = build_table_report(table, store)
    section = report["sections"][0]
    assert cell(section, "Offline/+Linear stem", "Train memory measured") == "OOM at 0.01 GiB"
    assert cell(section, "Online/+DBB", "status", "Training cost") == "failed"
    size = section.family("Size")
    assert size.columns == ["row", "Params (train)", "Params (deploy)", "MACs (deploy)"]
    assert cell(section, "Online/Base", "Params (deploy)", "Size") == "11.69M"
    assert cell(section, "Online/Base", "MACs (deploy)", "Size") == "1.82G"
    assert cell(section, "Online/Base", "Latency", "Deployed inference") == "0.01 s"
    where = {p["row"]: p for p in section.provenance}
    assert where["Online/+DBB"]["error"] == "RuntimeError: boom"
    assert (where["Online/Base"]["device"], where["Online/Base"]["threads"]) == ("cpu: test", "2")
    stem = claim_results(section, "the offline deep stem")
    assert stem["Offline/+Linear stem"]["measured"] == "OOM at 0.01 GiB"
    assert stem["Offline/+Linear stem"]["verdict"] == "n/a (regime)"  # smoke costs are not the paper's regime
    md = render_markdown(report)
    assert "| Offline/+Linear stem | failed" not in md and "RuntimeError: boom |" in md


HOSTILE = "<img src=x onerror=alert(1)> <script>alert(2)</script>"


def test_a_hostile_error_is_text_in_markdown_and_html(store):
    table = suites.get_table("fig8")
    fill(store, table, "smoke", {"Online/Base": [{"time_per_batch": 1.0, **ratio(1.0)}],
                                 "Offline/+DBB": [{"time_per_batch": 2.0, **ratio(2.0)}]})
    fill(store, table, "smoke", {"Online/+DBB": [{}]}, status="failed", error=HOSTILE)
    report = build_table_report(table, store)
    md = render_markdown(report)
    assert "7.5G ≈" in md and "read from a figure" in md and "Scale: smoke" in md
    assert "<img" not in md and "<script" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    site = render_site([report])
    page = site["orepa.fig8.html"]
    assert "<img src=x" not in page and "<script>alert" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "data:image/png;base64," in page


def test_the_site_links_every_table_and_puts_methods_side_by_side(store):
    t4, fig8 = suites.get_table("table4"), suites.get_table("fig8")
    fill(store, t4, "smoke", {"ResNet-18/None": [{"top1": 50.0, "time_per_batch": 0.1, "train_memory": 0.3,
                                                  "latency": 0.01}],
                              "ResNet-18/DBB": [{"top1": 40.0, "time_per_batch": 0.3, "train_memory": 0.6,
                                                 "latency": 0.012}]})
    fill(store, fig8, "smoke", {"Online/+DBB": [{"time_per_batch": 0.2, "train_memory": 0.4, "latency": 0.011}]})
    reports = [build_table_report(t, store) for t in suites.TABLES.values() if t.paper == "orepa"]
    site = render_site(reports)
    assert {"index.html", "leaderboard.html", "orepa.table4.html", "orepa.fig8.html"} <= set(site)
    index = site["index.html"]
    assert all(f'href="{t.key}.html"' in index for t in suites.TABLES.values() if t.paper == "orepa")
    board = site["leaderboard.html"]
    assert "<h1>Leaderboard</h1>" in board and 'class="sortable"' in board
    rows = re.findall(r"<tr><td>(orepa\.\w+)</td><td>([^<]+)</td>", board)
    assert set(rows) == {("orepa.table4", "ResNet-18/None"), ("orepa.table4", "ResNet-18/DBB"),
                         ("orepa.fig8", "Online/+DBB")}  # one recipe (smoke): side by side
    assert board.count("data:image/png;base64,") >= 3  # scatters: accuracy vs time, vs memory, vs latency...


def test_never_run(store):
    report = build_table_report(suites.get_table("supp_table2"), store)
    assert report["never_run"] and "has not been run yet" in render_markdown(report)


def test_a_row_shows_only_its_newest_config_and_lists_older_runs_as_superseded(store):
    """A finished run of an older config (here: another lr; a code change gives another config hash the same way)
    and one of the new config for the same row: only the new one's numbers, the old one listed with its commit."""
    table = suites.get_table("table1")
    old_table = dataclasses.replace(table, recipes={**table.recipes,
                                                    "smoke": dataclasses.replace(table.recipes["smoke"], lr=0.05)})
    fill(store, old_table, "smoke", {"DBB-18/Original": [{"top1": 10.0}]})
    (old_run,) = store.runs_frame(table.key).itertuples()
    store.log_environment(int(old_run.id), {"git_commit": "0123456789abcdef", "python": "3.11", "torch": "2",
                                            "device_name": "cpu", "host": "h"})
    (job,) = plan(table, "smoke", 1, ["DBB-18/Original"], "data", store.url)
    assert store.superseded(job.spec) == {int(old_run.id): ["lr", "recipe.lr"]}
    fill(store, table, "smoke", {"DBB-18/Original": [{"top1": 70.0}]})
    report = build_table_report(table, store)
    section = report["sections"][0]
    assert cell(section, "DBB-18/Original", "Top-1 acc measured") == "70 %"  # not the mean with 10
    assert section.superseded == [{"row": "DBB-18/Original", "id": int(old_run.id), "seed": 0,
                                   "config": old_run.config_hash[:12], "commit": "0123456789ab", "status": "finished"}]
    md = render_markdown(report)
    assert "Superseded" in md and f"| DBB-18/Original | {old_run.id} | 0 | {old_run.config_hash[:12]} | 0123456789ab |" \
        in md
    assert "0123456789ab" in render_site([report])["orepa.table1.html"]


def test_the_code_fingerprint_is_part_of_the_config(store, monkeypatch):
    from runners import jobs
    table = suites.get_table("table1")
    (before,) = plan(table, "smoke", 1, ["DBB-18/Original"], "data", store.url)
    assert before.config["code"] == jobs.code_fingerprint() and len(before.config["code"]["source"]) == 16
    monkeypatch.setattr(jobs, "code_fingerprint", lambda: {"probe_version": jobs.PROBE_VERSION, "source": "x" * 16})
    (after,) = plan(table, "smoke", 1, ["DBB-18/Original"], "data", store.url)
    assert after.spec.config_hash != before.spec.config_hash and after.spec.run_key != before.spec.run_key


def test_a_busy_machine_is_noted(store):
    table = suites.get_table("table4")
    fill(store, table, "mini", {"ResNet-18/DBB": [{**ratio(2.0), "machine_busy": 1.0, "other_cpu_share": 0.6}],
                                "ResNet-18/OREPA": [{**ratio(1.5), "machine_busy": 0.0, "other_cpu_share": 0.01}]})
    section = build_table_report(table, store)["sections"][0]
    assert section.busy == ["ResNet-18/DBB (60% of the CPUs used by other processes)"]
    assert "Timed while the machine was busy" in render_markdown(build_table_report(table, store))
