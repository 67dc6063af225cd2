"""From the results store to report data: pandas frames in, plain dicts out (rendered by reports.render)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from suites import METRICS, Table

DONE = ("finished", "diverged")


@dataclass
class Section:
    """One scale of one table: rows x (paper | measured | delta | reproduced?), plus cost ratios."""

    scale: str
    recipe: dict
    columns: list[str]
    rows: list[dict]
    regime_note: str
    devices: list[str]
    plot_groups: dict = field(default_factory=dict)  # group -> {row: {metric: (measured ratio, paper ratio)}}


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    series = pd.Series(values, dtype=float)
    if series.isna().any():
        return float("nan"), None
    return float(series.mean()), float(series.std(ddof=1)) if len(series) > 1 else None


def build_section(table: Table, scale: str, runs: pd.DataFrame, metrics: pd.DataFrame) -> Section:
    recipe = table.recipes[scale]
    at_paper_regime = table.paper_regime is not None and \
        (recipe.cost_batch, recipe.cost_resolution) == table.paper_regime
    regime = f"cost measured at batch {recipe.cost_batch} x {recipe.cost_resolution}x{recipe.cost_resolution}"
    regime += " (the paper's regime)" if at_paper_regime else \
        (f"; the paper's regime is {table.paper_regime[0]} x {table.paper_regime[1]}x{table.paper_regime[1]}, "
         "so cost is not judged here" if table.paper_regime else "")
    measured: dict[str, dict[str, tuple]] = {}
    status: dict[str, str] = {}
    devices = set()
    for row in table.rows:
        row_runs = runs[(runs.row_name == row.name) & (runs.scale == scale)]
        status[row.name] = ", ".join(sorted(set(row_runs.status))) or "not run"
        done_ids = set(row_runs[row_runs.status.isin(DONE)].id)
        row_metrics = metrics[metrics.run_id.isin(done_ids)]
        devices.update(d for d in row_metrics.device.dropna().unique())
        measured[row.name] = {}
        for name in table.metrics:
            values = row_metrics[row_metrics.name == name]
            mean, std = _mean_std(list(values.value))
            unit = values.unit.iloc[0] if len(values) else METRICS[name].unit
            device = ", ".join(sorted(set(values.device.dropna()))) or "–"
            measured[row.name][name] = (mean, std, unit, device, len(values))
    columns = ["row", "status"]
    for name in table.metrics:
        label = METRICS[name].label
        columns += [f"{label} paper", f"{label} measured", f"{label} delta" if METRICS[name].kind == "accuracy"
                    else f"{label} ratio (paper)", f"{label} reproduced?"]
    rows = []
    plot_groups: dict = {}
    for row in table.rows:
        cells = {"row": row.name, "status": status[row.name]}
        baseline = table.baseline_of(row)
        for name in table.metrics:
            spec = METRICS[name]
            paper = row.paper.get(name)
            mean, std, unit, device, n = measured[row.name][name]
            paper_text = (paper.text + (" ≈" if paper.approximate else "")) if paper else "–"
            shown = "–" if mean is None else (_fmt(mean) + (f" ± {_fmt(std, 2)}" if std is not None else "")
                                              + f" {unit}")
            cells[f"{spec.label} paper"] = paper_text
            cells[f"{spec.label} measured"] = shown
            if spec.kind == "accuracy":
                delta = None if mean is None or paper is None or paper.value is None or math.isnan(mean) \
                    or math.isnan(paper.value) else mean - paper.value
                cells[f"{spec.label} delta"] = "–" if delta is None else f"{delta:+.2f}"
                if scale != "paper":
                    verdict = "n/a (scale)"
                elif mean is None or paper is None or paper.value is None:
                    verdict = "–"
                elif math.isnan(paper.value):
                    verdict = "yes" if math.isnan(mean) else "no"
                else:
                    verdict = "yes" if delta is not None and abs(delta) <= table.accuracy_tolerance else "no"
                cells[f"{spec.label} reproduced?"] = verdict
            else:
                base_mean = measured.get(baseline, {}).get(name, (None,))[0] if baseline else None
                ratio = mean / base_mean if mean is not None and base_mean else None
                base_paper = table.row(baseline).paper.get(name) if baseline else None
                paper_ratio = paper.value / base_paper.value if paper and base_paper and paper.value and \
                    base_paper.value else None
                cells[f"{spec.label} ratio (paper)"] = \
                    f"{_fmt(ratio)}x ({_fmt(paper_ratio)}x)" if ratio is not None or paper_ratio is not None else "–"
                plot_groups.setdefault(row.group, {}).setdefault(row.name, {})[name] = (ratio, paper_ratio)
                cells[f"{spec.label} reproduced?"] = _cost_verdict(table, row, name, measured, scale) \
                    if at_paper_regime else "n/a (regime)"
        rows.append(cells)
    return Section(scale, recipe.as_dict(), columns, rows, regime, sorted(devices), plot_groups)


def _cost_verdict(table: Table, row, name: str, measured: dict, scale: str) -> str:
    """At the paper's regime a cost is reproduced when the row keeps the paper's order against every other row of
    its group (e.g. None < OREPA < DBB)."""
    group = [r for r in table.rows if r.group == row.group and r.name != row.name]
    mine = measured[row.name][name][0]
    paper_mine = row.paper.get(name)
    if mine is None or paper_mine is None or paper_mine.value is None:
        return "–"
    for other in group:
        theirs = measured[other.name][name][0]
        paper_theirs = other.paper.get(name)
        if theirs is None or paper_theirs is None or paper_theirs.value is None:
            continue
        if (mine < theirs) != (paper_mine.value < paper_theirs.value):
            return "no"
    return "yes"


def build_table_report(table: Table, store) -> dict:
    """Everything a report of ``table`` shows, read from ``store`` (None: no database yet)."""
    if store is None:
        runs, metrics, envs = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    else:
        runs, metrics, envs = (store.runs_frame(table.key), store.metrics_frame(table.key),
                               store.environments_frame(table.key))
    report = {"table": table, "sections": [], "runs": [], "environments": [], "never_run": runs.empty}
    if runs.empty:
        return report
    for scale in [s for s in table.scales if s in set(runs.scale)]:
        report["sections"].append(build_section(table, scale, runs, metrics))
    report["runs"] = runs[["id", "run_key", "row_name", "scale", "seed", "status", "attempt", "executor",
                           "diverged_step", "error"]].to_dict("records")
    if not envs.empty:
        cols = ["git_commit", "git_dirty", "python", "torch", "cuda", "mmcv", "device_name", "host"]
        report["environments"] = envs[cols].drop_duplicates().to_dict("records")
    return report
