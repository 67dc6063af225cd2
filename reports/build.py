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
    superseded: list[dict] = field(default_factory=list)  # finished runs of an older config: listed, not averaged
    busy: list[str] = field(default_factory=list)  # rows timed while the machine was busy


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


def current_runs(row_runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A row's runs of its newest config (the config of its latest finished run; all its runs if none finished),
    and its finished runs of older configs (superseded: a recipe or the measuring code changed since)."""
    done = row_runs[row_runs.status.isin(DONE)]
    if done.empty:
        return row_runs, done
    newest = done.sort_values(["ended_ms", "id"]).config_hash.iloc[-1]
    return row_runs[row_runs.config_hash == newest], done[done.config_hash != newest]


def _ratio(values: pd.DataFrame, name: str) -> tuple[float | None, float | None, float | None]:
    """A cost's ratio to the group's baseline as the runs measured it side by side (probes.compare_costs): the mean
    of the runs' medians, and the spread (lowest first quartile, highest third quartile over the runs)."""
    medians = values[values.name == f"{name}_ratio"].value.dropna()
    if medians.empty:
        return None, None, None
    low = values[values.name == f"{name}_ratio_q1"].value.dropna()
    high = values[values.name == f"{name}_ratio_q3"].value.dropna()
    return (float(medians.mean()), float(low.min()) if len(low) else None,
            float(high.max()) if len(high) else None)


def _fmt_ratio(ratio: tuple) -> str:
    mean, low, high = ratio
    if mean is None:
        return "–"
    spread = f" [{_fmt(low)}–{_fmt(high)}]" if low is not None and high is not None and high > low else ""
    return f"{_fmt(mean)}x{spread}"


def build_section(table: Table, scale: str, runs: pd.DataFrame, metrics: pd.DataFrame,
                  envs: pd.DataFrame | None = None) -> Section:
    recipe = table.recipes[scale]
    at_paper_regime = table.paper_regime is not None and \
        (recipe.cost_batch, recipe.cost_resolution) == table.paper_regime
    regime = f"cost measured at batch {recipe.cost_batch} x {recipe.cost_resolution}x{recipe.cost_resolution}"
    regime += " (the paper's regime)" if at_paper_regime else \
        (f"; the paper's regime is {table.paper_regime[0]} x {table.paper_regime[1]}x{table.paper_regime[1]}, "
         "so cost is not judged here" if table.paper_regime else "")
    commits = {} if envs is None or envs.empty else dict(zip(envs.run_id, envs.git_commit))
    measured: dict[str, dict[str, tuple]] = {}
    ratios: dict[str, dict[str, tuple]] = {}
    status: dict[str, str] = {}
    devices = set()
    superseded, busy = [], []
    for row in table.rows:
        current, old = current_runs(runs[(runs.row_name == row.name) & (runs.scale == scale)])
        status[row.name] = ", ".join(sorted(set(current.status))) or "not run"
        superseded += [{"row": row.name, "id": int(r.id), "seed": int(r.seed), "config": r.config_hash[:12],
                        "commit": (commits.get(r.id) or "unknown")[:12], "status": r.status}
                       for r in old.itertuples()]
        done_ids = set(current[current.status.isin(DONE)].id)
        row_metrics = metrics[metrics.run_id.isin(done_ids)]
        devices.update(d for d in row_metrics.device.dropna().unique())
        if (row_metrics[row_metrics.name == "machine_busy"].value == 1).any():  # runners/probes.py, Load
            share = row_metrics[row_metrics.name == "other_cpu_share"].value.max()
            busy.append(f"{row.name} ({100 * share:.0f}% of the CPUs used by other processes)")
        measured[row.name], ratios[row.name] = {}, {}
        for name in table.metrics:
            values = row_metrics[row_metrics.name == name]
            mean, std = _mean_std(list(values.value))
            unit = values.unit.iloc[0] if len(values) else METRICS[name].unit
            device = ", ".join(sorted(set(values.device.dropna()))) or "–"
            measured[row.name][name] = (mean, std, unit, device, len(values))
            ratios[row.name][name] = _ratio(row_metrics, name)
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
                ratio = ratios[row.name][name]
                base_paper = table.row(baseline).paper.get(name) if baseline else None
                paper_ratio = paper.value / base_paper.value if paper and base_paper and paper.value and \
                    base_paper.value else None
                cells[f"{spec.label} ratio (paper)"] = \
                    f"{_fmt_ratio(ratio)} ({_fmt(paper_ratio)}x)" if ratio[0] is not None or paper_ratio is not None \
                    else "–"
                plot_groups.setdefault(row.group, {}).setdefault(row.name, {})[name] = (ratio[0], paper_ratio)
                cells[f"{spec.label} reproduced?"] = _cost_verdict(table, row, name, ratios) \
                    if at_paper_regime else "n/a (regime)"
        rows.append(cells)
    return Section(scale, recipe.as_dict(), columns, rows, regime, sorted(devices), plot_groups, superseded, busy)


def _cost_verdict(table: Table, row, name: str, ratios: dict) -> str:
    """At the paper's regime a cost is reproduced when the row keeps the paper's order against every other row of
    its group (e.g. None < OREPA < DBB), compared by the ratios to the group's baseline each run measured side by
    side (the baseline's is 1)."""
    group = [r for r in table.rows if r.group == row.group and r.name != row.name]
    mine = ratios[row.name][name][0]
    paper_mine = row.paper.get(name)
    if mine is None or paper_mine is None or paper_mine.value is None:
        return "–"
    for other in group:
        theirs = ratios[other.name][name][0]
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
        report["sections"].append(build_section(table, scale, runs, metrics, envs))
    report["runs"] = runs[["id", "run_key", "row_name", "scale", "seed", "status", "attempt", "executor",
                           "diverged_step", "error"]].to_dict("records")
    if not envs.empty:
        cols = ["git_commit", "git_dirty", "python", "torch", "cuda", "mmcv", "device_name", "host"]
        report["environments"] = envs[cols].drop_duplicates().to_dict("records")
    return report
