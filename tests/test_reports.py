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


def test_cost_ratios_against_the_group_baseline(store):
    table = suites.get_table("table4")
    fill(store, table, "mini", {"ResNet-18/None": [{"time_per_batch": 2.0, "train_memory": 1.0}],
                                "ResNet-18/DBB": [{"time_per_batch": 5.0, "train_memory": 2.5}],
                                "ResNet-18/OREPA": [{"time_per_batch": 3.0, "train_memory": 1.2}]})
    section = build_table_report(table, store)["sections"][0]
    # measured 5.0/2.0 = 2.5x beside the paper's 0.241/0.086 = 2.80x
    assert cell(section, "ResNet-18/DBB", "Time/batch ratio (paper)") == "2.5x (2.8x)"
    assert cell(section, "ResNet-18/OREPA", "Train memory ratio (paper)") == "1.2x (1.24x)"
    assert cell(section, "ResNet-18/DBB", "Time/batch reproduced?") == "n/a (regime)"
    assert "not judged" in section.regime_note


def test_cost_order_verdict_at_the_paper_regime(store):
    table = suites.get_table("table4")
    fill(store, table, "paper", {"ResNet-18/None": [{"time_per_batch": 0.1}],
                                 "ResNet-18/DBB": [{"time_per_batch": 0.2}],
                                 "ResNet-18/OREPA": [{"time_per_batch": 0.3}]})  # OREPA slower than DBB: wrong order
    section = build_table_report(table, store)["sections"][0]
    assert cell(section, "ResNet-18/None", "Time/batch reproduced?") == "yes"
    assert cell(section, "ResNet-18/OREPA", "Time/batch reproduced?") == "no"
    assert cell(section, "ResNet-18/DBB", "Time/batch reproduced?") == "no"


def test_markdown_and_html(store):
    table = suites.get_table("fig8")
    fill(store, table, "smoke", {"Online/Base": [{"time_per_batch": 1.0, "train_memory": 1.0}],
                                 "Offline/+DBB": [{"time_per_batch": 2.0, "train_memory": 3.0}]},
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
