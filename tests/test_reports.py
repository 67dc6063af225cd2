"""Reports are computed from the store alone: paper value, mean ± std over seeds, delta, verdicts, cost ratios
against the group's baseline; HTML is escaped."""

import dataclasses

import pytest

import suites
from reports import build_table_report, render_html, render_markdown
from results import MetricRecord, Store
from runners.jobs import plan


def fill(store, table, scale, values, status="finished", error=None):
    """values: row -> list over seeds of {metric: value}."""
    for job in plan(table, scale, max(len(v) for v in values.values()), list(values), "data", store.url):
        per_seed = values[job.spec.row_name]
        if job.spec.seed >= len(per_seed):
            continue
        run = store.ensure_run(job.spec)
        claim = store.claim(run.id, lease_s=60, pid=1, host="h", executor="local")
        store.log_metrics(run.id, [MetricRecord(k, v, suites.METRICS[k].unit if k in suites.METRICS else "x",
                                                device="cpu: test")
                                   for k, v in per_seed[job.spec.seed].items()], owner=claim.owner)
        store.finish_run(run.id, status, error=error, claim=claim)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/r.sqlite")
    yield s
    s.close()


def cell(section, row, column):
    return next(r for r in section.rows if r["row"] == row)[column]


def test_accuracy_mean_std_delta_and_scale_verdict(store):
    table = suites.get_table("table1")
    fill(store, table, "smoke", {"DBB-18/Original": [{"top1": 70.0}, {"top1": 72.0}]})
    report = build_table_report(table, store)
    section = report["sections"][0]
    assert cell(section, "DBB-18/Original", "Top-1 acc paper") == "71.77"
    assert cell(section, "DBB-18/Original", "Top-1 acc measured").startswith("71 ± 1.4")
    assert cell(section, "DBB-18/Original", "Top-1 acc delta") == "-0.77"
    assert cell(section, "DBB-18/Original", "Top-1 acc reproduced?") == "n/a (scale)"
    assert cell(section, "RepVGG-A0/Original", "status") == "not run"


def test_paper_scale_accuracy_verdicts(store):
    table = suites.get_table("table3")
    fill(store, table, "paper", {"ResNet-18/Vector scaling": [{"top1": 72.30}],
                                 "ResNet-18/Scalar scaling": [{"top1": 71.60}],
                                 "ResNet-18/W/o post-addition norm": [{"top1": float("nan")}]})
    section = build_table_report(table, store)["sections"][0]
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
    assert cell(section, "ResNet-18/DBB", "Time/batch ratio (paper)") == "2.9x [2.8–3.1] (2.8x)"
    assert cell(section, "ResNet-18/OREPA", "Train memory ratio (paper)") == "1.2x (1.24x)"
    assert cell(section, "ResNet-18/None", "Time/batch ratio (paper)") == "1x (1x)"
    assert cell(section, "ResNet-18/DBB", "Time/batch measured") == "5 s"
    assert cell(section, "ResNet-18/DBB", "Time/batch reproduced?") == "n/a (regime)"
    assert "not judged" in section.regime_note
    assert "measured side by side" in render_markdown(build_table_report(table, store))


def test_cost_ratio_spread_over_seeds(store):
    table = suites.get_table("table4")
    fill(store, table, "mini", {"ResNet-18/DBB": [ratio(2.0, 1.9, 2.2), ratio(3.0, 2.7, 3.3)]})
    section = build_table_report(table, store)["sections"][0]
    assert cell(section, "ResNet-18/DBB", "Time/batch ratio (paper)") == "2.5x [1.9–3.3] (2.8x)"


def test_cost_order_verdict_at_the_paper_regime(store):
    table = suites.get_table("table4")
    fill(store, table, "paper", {"ResNet-18/None": [ratio(1.0)], "ResNet-18/DBB": [ratio(2.0)],
                                 "ResNet-18/OREPA": [ratio(3.0)]})  # OREPA slower than DBB: wrong order
    section = build_table_report(table, store)["sections"][0]
    assert cell(section, "ResNet-18/None", "Time/batch reproduced?") == "yes"
    assert cell(section, "ResNet-18/OREPA", "Time/batch reproduced?") == "no"
    assert cell(section, "ResNet-18/DBB", "Time/batch reproduced?") == "no"


def test_markdown_and_html(store):
    table = suites.get_table("fig8")
    fill(store, table, "smoke", {"Online/Base": [{"time_per_batch": 1.0, **ratio(1.0)}],
                                 "Offline/+DBB": [{"time_per_batch": 2.0, **ratio(2.0)}]},
         error="<script>alert(1)</script>")
    report = build_table_report(table, store)
    md = render_markdown(report)
    assert "7.5G ≈" in md and "read from a figure" in md and "Scale: smoke" in md
    html = render_html([report])
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert "data:image/png;base64," in html


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
    assert "0123456789ab" in render_html([report])


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
