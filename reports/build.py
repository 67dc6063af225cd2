"""From the results store to report data: pandas frames in, plain dicts out (rendered by reports.render).

A table's report has one :class:`Section` per scale it ran at; a section holds one compact table per metric family
(accuracy, training cost, size, inference), the paper's claims judged from the measured ratios, and where each row's
numbers come from (device, threads, commit). Accuracy is compared with the paper only at the paper scale; costs are
judged only at the paper's regime (per-device batch x resolution); elsewhere the measured figures are shown as they
are."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

from suites import METRICS, Claim, Ordering, Table

DONE = ("finished", "diverged")
SIZE = ("params_train", "params_deploy", "params_srep", "macs_train", "macs_deploy", "macs_srep", "params_avg",
        "macs_avg")
INFERENCE = ("latency", "throughput")
HISTOGRAM_POSITIONS = ("all", "central", "surrounding")
ENVIRONMENT = ("git_commit", "git_dirty", "python", "torch", "torchvision", "mmcv", "mmengine", "numpy", "cuda",
               "cudnn", "driver", "gpu_count", "device_name", "cpu_affinity", "host", "uv_lock_sha256", "command")
LABELS = {"params_train": "Params (train)", "params_deploy": "Params (deploy)", "macs_train": "MACs (train)",
          "macs_deploy": "MACs (deploy)", "params_avg": "Avg. params (training)", "macs_avg": "Avg. MACs (training)",
          "latency": "Latency", "throughput": "Throughput", "params_srep": "Params (sRep)", "macs_srep": "MACs (sRep)"}


@dataclass
class Family:
    """One compact table: a title, its columns and one dict of display strings per row."""

    title: str
    columns: list[str]
    rows: list[dict]


@dataclass
class Section:
    """One scale of one table."""

    scale: str
    recipe: dict
    regime_note: str
    devices: list[str]
    families: list[Family]
    claims: list[dict]                # {text, source, results: [{pair, measured, paper, verdict}]}
    provenance: list[dict]            # per row: status, error, device, threads, commit, seeds
    plot: dict = field(default_factory=dict)   # metric -> group -> row -> (ratio, low, high, paper ratio)
    chain: bool = False               # the table is a chain of components (Figure 8): plot curves
    points: list[dict] = field(default_factory=list)  # per row, for the leaderboard
    superseded: list[dict] = field(default_factory=list)  # finished runs of an older config: listed, not averaged
    busy: list[str] = field(default_factory=list)  # rows timed while the machine was busy
    departures: list[str] = field(default_factory=list)  # rows with a recipe of their own (Row.recipe), what differs
    recipe_text: str = ""             # the recipe in words (a classification or a dense recipe)
    deployed: list[str] = field(default_factory=list)  # dense rows: the metric of the trained and the deployed model
    # the sampled kernel's parameter distribution per row (RepOptimizers Figures 3 and 5; runners/quant.py
    # kernel_histograms): row -> {"range": m, "all" / "central" / "surrounding": shares per bin over [-m, m]}
    histograms: dict = field(default_factory=dict)

    def family(self, title: str) -> Family:
        return next(f for f in self.families if f.title == title)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def _count(value: float | None) -> str:
    """11689512 -> 11.69M; 1.8e9 -> 1.82G."""
    if value is None or math.isnan(value):
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


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


def _oom(values: pd.DataFrame) -> str | None:
    """'OOM at X GiB' when every run of the metric hit the memory budget (the probe stores no value then)."""
    if values.empty or values.value.notna().any():
        return None
    for method in values.method.dropna():
        found = re.search(r"OOM at budget ([\d.]+) GiB", method)
        if found:
            return f"OOM at {found.group(1)} GiB"
        if "OOM" in method:
            return "OOM (" + method.split(";")[0] + ")"
    return None


def first_line(text) -> str:
    """An error's first line (at most 200 characters); '' for none (None, or NaN from a frame)."""
    text = text.strip() if isinstance(text, str) else ""
    return text.splitlines()[0][:200] if text else ""


class _Row:
    """What the report knows of one row at one scale: its current runs' metrics and their status."""

    def __init__(self, row, runs: pd.DataFrame, metrics: pd.DataFrame, envs: dict, lineage: dict | None = None):
        current, self.old = current_runs(runs)
        self.row, self.runs = row, current
        self.status = ", ".join(sorted(set(current.status))) or (f"not run ({row.declared})" if row.declared
                                                                  else "not run")
        failed = current[current.status == "failed"]
        self.error = first_line(failed.error.iloc[-1]) if len(failed) else ""
        done_ids = set(current[current.status.isin(DONE)].id)
        self.metrics = metrics[metrics.run_id.isin(done_ids)] if len(metrics) else metrics
        self.seeds = len(done_ids)
        self.commits = sorted({(envs.get(i) or "unknown")[:12] for i in done_ids})
        self.inputs = sorted({(lineage or {})[i] for i in done_ids if i in (lineage or {})})

    def values(self, name: str) -> pd.DataFrame:
        return self.metrics[self.metrics.name == name] if len(self.metrics) else self.metrics

    def mean(self, name: str) -> float | None:
        return _mean_std(list(self.values(name).value))[0]

    def measured(self, name: str, unit: str | None = None, fmt=_fmt) -> str:
        values = self.values(name)
        oom = _oom(values)
        if oom:
            return oom
        mean, std = _mean_std(list(values.value))
        if mean is None:
            return self.error and "failed" or "–"
        unit = unit if unit is not None else (values.unit.iloc[0] if len(values) else METRICS[name].unit)
        shown = fmt(mean) + (f" ± {_fmt(std, 2)}" if std is not None else "")
        spread = self.values(f"{name}_std")  # a latency's spread over its timed forwards (one run: no seeds' std)
        if std is None and len(spread):
            shown += f" ± {fmt(float(spread.value.mean()))}"
        return f"{shown} {unit}".strip() + (f" (n={len(values)})" if len(values) > 1 else "")

    def ratio(self, name: str) -> tuple:
        return _ratio(self.metrics, name) if len(self.metrics) else (None, None, None)

    def where(self) -> dict:
        devices = sorted(set(self.metrics.device.dropna())) if len(self.metrics) else []
        threads = sorted({int(t) for t in self.metrics.threads.dropna()}) if len(self.metrics) else []
        return {"row": self.row.name, "status": self.status, "error": self.error, "seeds": self.seeds,
                "device": "; ".join(devices) or "–", "threads": ", ".join(map(str, threads)) or "–",
                "commit": ", ".join(self.commits) or "–", "inputs": "; ".join(self.inputs) or "–"}


def _paper_ratio(table: Table, row, name: str) -> float | None:
    baseline = table.baseline_of(row)
    root = name.rsplit("_", 1)[0] if name.endswith(("_train", "_srep", "_linear")) else name
    printed = table.row(baseline).paper if baseline else {}
    # a form's value against the baseline's same form, else its deployed or training one (a plain baseline prints one)
    paper, base = row.paper.get(name), printed.get(name) or printed.get(root) or printed.get(f"{root}_train")
    if paper is None or base is None or not paper.value or not base.value:
        return None
    return paper.value / base.value


def _paper_and_measured(label: str, paper, r: _Row, name: str) -> dict[str, str]:
    """The value as printed (≈: read from a figure) beside the measured one."""
    return {f"{label} paper": (paper.text + (" ≈" if paper.approximate else "")) if paper else "–",
            f"{label} measured": r.measured(name)}


PUBLISHED = "repbench.published"  # run_suite evaluate (runners/evaluate.py)


def _variant_key(arch: str, rep: str, variant_params: dict[str, str]) -> tuple:
    return arch, rep, tuple(sorted(variant_params.items()))


def row_model_key(row) -> tuple | None:
    """A row's (arch, rep, resolved variant) as the runs' configs store it; None for a model this suite lacks."""
    from backbones import resolve_variant
    from results.store import _flatten
    try:
        variant = resolve_variant(row.rep, row.variant).as_dict()
    except (KeyError, ValueError):
        return None
    return _variant_key(row.arch, row.rep, _flatten({"variant": variant}))


def published_weights(store) -> dict[tuple, str]:
    """(arch, rep, variant) -> the top-1 of each official checkpoint of that model evaluated in this harness
    (``run_suite evaluate``), with its source."""
    import json
    runs = store.runs_frame(PUBLISHED)
    if runs.empty:
        return {}
    metrics = store.metrics_frame(PUBLISHED)
    found: dict[tuple, list[str]] = {}
    for run in runs[runs.status == "finished"].itertuples():
        params = store.params_of(run.id)
        top1 = metrics[(metrics.run_id == run.id) & (metrics.name == "top1")].value
        if len(top1):
            key = _variant_key(params["arch"], params["rep"], {k: json.dumps(v, sort_keys=True)
                                                                for k, v in params.items() if k.startswith("variant.")})
            found.setdefault(key, []).append(f"{top1.iloc[0]:.2f} ({params['published.source']})")
    return {key: "; ".join(values) for key, values in found.items()}


def _accuracy_family(table, scale, rows: dict[str, _Row], names, spread: float, published: dict | None = None
                     ) -> Family:
    """At the paper scale: paper | measured | delta | verdict; elsewhere the scale's own numbers beside the paper's
    (a delta between a smoke run and ImageNet means nothing). A row whose seeds' std exceeds ``spread`` points is
    flagged: its mean does not rank it. Where official checkpoints of a row's model were evaluated here
    (``published``), top-1 shows them as a third value, "published weights"."""
    keys = {row.name: row_model_key(row) for row in table.rows} if published else {}
    shown = [n for n in names if n == "top1"] if any(k in (published or {}) for k in keys.values()) else []
    columns = ["row", "status"]
    for name in names:
        label = METRICS[name].label
        columns += [f"{label} paper", f"{label} measured"] + ([f"{label} published weights"] if name in shown else []) \
            + ([f"{label} delta", f"{label} reproduced?"] if scale == "paper" else [])
    out = []
    for row in table.rows:
        r = rows[row.name]
        cells = {"row": row.name, "status": r.status}
        for name in names:
            label, paper = METRICS[name].label, row.paper.get(name)
            cells.update(_paper_and_measured(label, paper, r, name))
            if name in shown:
                cells[f"{label} published weights"] = published.get(keys[row.name], "–")
            std = _mean_std(list(r.values(name).value))[1]
            if std is not None and std > spread:
                cells[f"{label} measured"] += f" ⚠ seeds disagree (std > {spread:g})"
            if scale != "paper":
                continue
            mean = r.mean(name)
            delta = None if mean is None or paper is None or paper.value is None or math.isnan(mean) \
                or math.isnan(paper.value) else mean - paper.value
            cells[f"{label} delta"] = "–" if delta is None else f"{delta:+.2f}"
            if mean is None or paper is None or paper.value is None:
                verdict = "–"
            elif math.isnan(paper.value):
                verdict = "yes" if math.isnan(mean) else "no"
            else:
                verdict = "yes" if delta is not None and abs(delta) <= table.accuracy_tolerance else "no"
            cells[f"{label} reproduced?"] = verdict
        out.append(cells)
    return Family("Accuracy", columns, out)


def _cost_family(table, rows, names, at_paper_regime: bool) -> Family:
    columns = ["row", "status"]
    for name in names:
        label = METRICS[name].label
        columns += [f"{label} paper", f"{label} measured", f"{label} ratio", f"{label} paper ratio",
                    f"{label} reproduced?"]
    ratios = {row.name: {name: rows[row.name].ratio(name) for name in names} for row in table.rows}
    out = []
    for row in table.rows:
        r = rows[row.name]
        cells = {"row": row.name, "status": r.status}
        for name in names:
            label, paper = METRICS[name].label, row.paper.get(name)
            cells.update(_paper_and_measured(label, paper, r, name))
            cells[f"{label} ratio"] = _fmt_ratio(ratios[row.name][name])
            paper_ratio = _paper_ratio(table, row, name)
            cells[f"{label} paper ratio"] = "–" if paper_ratio is None else f"{_fmt(paper_ratio)}x"
            cells[f"{label} reproduced?"] = _cost_verdict(table, row, name, ratios) if at_paper_regime \
                else "n/a (regime)"
        out.append(cells)
    return Family("Training cost", columns, out)


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


def _size_family(table, rows) -> Family | None:
    present = [n for n in SIZE if any(len(rows[r.name].values(n)) for r in table.rows)]
    if not present:
        return None
    printed = [n for n in present if any(n in row.paper for row in table.rows)]  # e.g. RepOptimizers Table 1
    columns, out = ["row"], []
    for n in present:
        columns += [f"{LABELS[n]} paper", LABELS[n]] if n in printed else [LABELS[n]]
    for row in table.rows:
        cells = {"row": row.name}
        for n in present:
            if n in printed:
                cells[f"{LABELS[n]} paper"] = row.paper[n].text if n in row.paper else "–"
            cells[LABELS[n]] = rows[row.name].measured(n, "", _count)
        out.append(cells)
    return Family("Size", columns, out)


def _statistic_family(table, rows) -> Family | None:
    """Properties of trained weights (kernel std: RepOptimizers Tables 8, 11): printed beside measured, per metric;
    whether their order holds is the orderings' business (the claims)."""
    present = [n for n in table.metrics if METRICS[n].kind == "statistic"]
    if not present:
        return None
    columns, out = ["row", "status"], []
    for n in present:
        columns += [f"{METRICS[n].label} paper", f"{METRICS[n].label} measured"]
    for row in table.rows:
        r = rows[row.name]
        cells = {"row": row.name, "status": r.status}
        for n in present:
            cells[f"{METRICS[n].label} paper"] = row.paper[n].text if n in row.paper else "–"
            cells[f"{METRICS[n].label} measured"] = r.measured(n, "", lambda v: f"{v:.4f}")
        out.append(cells)
    return Family("Statistics of trained weights", columns, out)


def _inference_family(table, rows) -> Family | None:
    present = [n for n in INFERENCE if any(len(rows[r.name].values(n)) for r in table.rows)]
    if not present:
        return None
    columns, out = ["row"], []
    for n in present:
        columns += [LABELS[n], f"{LABELS[n]} ratio"]
    for row in table.rows:
        r = rows[row.name]
        cells = {"row": row.name}
        for n in present:
            cells[LABELS[n]] = r.measured(n)
            cells[f"{LABELS[n]} ratio"] = _fmt_ratio(r.ratio(n))
        out.append(cells)
    return Family("Deployed inference", columns, out)


QUANT_CELLS = (("INT8 top-1", "top1_ptq"), ("INT8 drop", "top1_ptq_drop"), ("Latency fp32 (compiled)",
               "latency_compiled_fp32"), ("Latency INT8 (compiled)", "latency_int8"))


def _quantization_family(table, rows) -> Family | None:
    """The quantization column (run_suite TABLE --quantize; runners/quant.py): INT8 PTQ top-1 of the deployed model
    and its drop from the float model on the same images, the INT8 and float latency on the same execution path,
    timed interleaved, and their paired ratio."""
    if not any(len(rows[r.name].values(n)) for r in table.rows for n in ("top1_ptq_drop", "latency_int8")):
        return None
    columns, out = ["row", "status"] + [label for label, _ in QUANT_CELLS] + ["INT8 / fp32 latency"], []
    for row in table.rows:
        r = rows[row.name]
        cells = {"row": row.name, "status": r.status, **{label: r.measured(name) for label, name in QUANT_CELLS}}
        cells["INT8 / fp32 latency"] = _fmt_ratio(r.ratio("latency_int8"))
        unmeasured = r.values("latency_int8")
        if len(unmeasured) and unmeasured.value.isna().all():  # no compiler here: the reason, not a dash
            cells["Latency INT8 (compiled)"] = first_line(unmeasured.method.iloc[0])
        out.append(cells)
    return Family("Quantization (INT8 PTQ, deployed model)", columns, out)


def judge_claim(claim: Claim, table: Table, rows: dict[str, _Row], at_paper_regime: bool) -> dict:
    """A printed claim, evaluated on every pair it names that was measured: the measured figure, the paper's own
    figure from its printed values, and a verdict at the paper's regime (elsewhere 'n/a (regime)')."""
    results = []
    for mine, other in claim.pairs:
        if mine not in rows or not rows[mine].seeds or \
                (claim.kind != "oom" and (other not in rows or not rows[other].seeds)):
            continue  # not measured (yet)
        if claim.kind == "oom":
            oom = _oom(rows[mine].values(claim.metric))
            measured_text = oom or "fits: " + rows[mine].measured(claim.metric)
            verdict = ("yes" if oom else "no") if at_paper_regime else "n/a (regime)"
            results.append({"pair": mine, "measured": measured_text, "paper": "did not fit", "verdict": verdict})
            continue
        paper = claim.figure(_paper_ratio(table, table.row(mine), claim.metric),
                             _paper_ratio(table, table.row(other), claim.metric))
        measured = claim.figure(rows[mine].ratio(claim.metric)[0], rows[other].ratio(claim.metric)[0])
        if measured is None:
            verdict = "–"
        elif not at_paper_regime:
            verdict = "n/a (regime)"
        else:
            verdict = "yes" if claim.holds(measured) else "no"
        results.append({"pair": f"{mine} vs {other}", "measured": claim.format(measured),
                        "paper": claim.format(paper), "verdict": verdict})
    return {"text": claim.text, "source": claim.source, "expected": claim.expected(), "results": results}


FORM_LABELS = {"train": "train", "srep": "sRep", "linear": "rRep-Linear"}


def judge_ordering(ordering: Ordering, table: Table, rows: dict[str, _Row]) -> dict:
    """An order of printed values (suites.base.Ordering), in the claims' shape: the measured cells in the paper's
    order, one result per neighbouring pair of them (cells not measured are skipped, so a row left out does not hide
    the pair around it), with whether the measured means kept the order on their device."""
    def label(row_name: str, metric: str) -> str:
        form = metric[len(ordering.metric) + 1:]
        if table.row(row_name).rep == "none" and form in ("", "train"):  # a plain model's one form
            return row_name
        if form:
            return f"{row_name} ({FORM_LABELS.get(form, form)})"
        forms = table.row(row_name).forms
        return f"{row_name} ({'rRep' if 'srep' in forms else 'deployed'})" if forms else row_name

    printed = sorted(((table.row(r).paper[m], r, m) for r, m in ordering.cells if table.row(r).paper[m].value),
                     key=lambda cell: cell[0].value)
    measured = [cell for cell in printed if rows[cell[1]].mean(cell[2]) is not None]
    results, devices = [], set()
    for (paper_a, row_a, m_a), (paper_b, row_b, m_b) in zip(measured, measured[1:]):
        mine, other = rows[row_a].mean(m_a), rows[row_b].mean(m_b)
        for r in (row_a, row_b):
            devices.update(rows[r].metrics.device.dropna())
        equal = paper_a.value == paper_b.value
        results.append({"pair": f"{label(row_a, m_a)} {'=' if equal else '<'} {label(row_b, m_b)}",
                        "paper": f"{paper_a.text} {'=' if equal else '<'} {paper_b.text}",
                        "measured": f"{rows[row_a].measured(m_a)} vs {rows[row_b].measured(m_b)}",
                        "verdict": "– (printed equal)" if equal else "held" if mine < other else "did not hold"})
    order = " < ".join(f"{label(r, m)} {p.text}" for p, r, m in printed)
    where = f"; measured on {', '.join(sorted(devices))}" if devices else ""
    return {"text": f"order: {ordering.text}{where}", "source": ordering.source,
            "expected": f"the paper's order: {order}", "results": results}


def lineage(store, table_key: str) -> dict[int, str]:
    """Run id -> where its inputs came from: a RepOpt row's scales file, named by the Hyper-Search run that wrote it
    (matched by sha256 over every table's recorded files), else by its path (run_suite --scales)."""
    used = store.artifacts_frame(table_name=table_key)
    used = used[used.kind.isin(("input_scales", "input_weights"))]
    if used.empty:
        return {}
    written = store.artifacts_frame()
    written = written[written.kind.isin(("scales", "weights_train", "weights_deploy"))]
    out = {}
    for u in used.itertuples():
        source = written[written.sha256 == u.sha256]
        who = (f"{source.table_name.iloc[0]} / {source.row_name.iloc[0]} seed {source.seed.iloc[0]} (run "
               f"{source.run_id.iloc[0]}{', ' + source.kind.iloc[0].split('_')[1] + ' form' if u.kind == 'input_weights' else ''})"
               if len(source) else f"the file {u.path}")
        what = "scales" if u.kind == "input_scales" else "weights"
        out[int(u.run_id)] = f"{what} from {who}, sha256 {u.sha256[:12]}"
    return out


def build_section(table: Table, scale: str, runs: pd.DataFrame, metrics: pd.DataFrame,
                  envs: pd.DataFrame | None = None, inputs: dict[int, str] | None = None,
                  published: dict | None = None) -> Section:
    recipe = table.recipes[scale]
    if table.runner == "dense":  # one train_step of each row's mm config; the paper's regime is the stock config's
        at_paper_regime = recipe.batch is None and recipe.image_scale is None and recipe.data == "real"
        regime = ("cost measured on one training step of each row's config at "
                  + (f"{recipe.cost_batch or recipe.batch} image(s) per device, " if recipe.batch else
                     "the config's batch per device, ")
                  + (f"{recipe.image_scale[0]}x{recipe.image_scale[1]}" if recipe.image_scale else
                     "the config's image scale") + f", {recipe.data} data"
                  + (" (the paper's regime)" if at_paper_regime else
                     "; the paper's regime is the stock config's batch and images, so cost is not judged here"))
    else:
        at_paper_regime = table.paper_regime is not None and \
            (recipe.cost_batch, recipe.cost_resolution) == table.paper_regime
        regime = f"cost measured at batch {recipe.cost_batch} x {recipe.cost_resolution}x{recipe.cost_resolution}"
        regime += " (the paper's regime)" if at_paper_regime else \
            (f"; the paper's regime is {table.paper_regime[0]} x {table.paper_regime[1]}x{table.paper_regime[1]}, "
             "so cost is not judged here" if table.paper_regime else "")
    commits = {} if envs is None or envs.empty else dict(zip(envs.run_id, envs.git_commit))
    rows = {row.name: _Row(row, runs[(runs.row_name == row.name) & (runs.scale == scale)], metrics, commits, inputs)
            for row in table.rows}
    superseded, busy = [], []
    for r in rows.values():
        superseded += [{"row": r.row.name, "id": int(o.id), "seed": int(o.seed), "config": o.config_hash[:12],
                        "commit": (commits.get(o.id) or "unknown")[:12], "status": o.status}
                       for o in r.old.itertuples()]
        if (r.values("machine_busy").value == 1).any():  # runners/probes.py, Load
            share = r.values("other_cpu_share").value.max()
            busy.append(f"{r.row.name} ({100 * share:.0f}% of the CPUs used by other processes)")
    families = []
    accuracy = [n for n in table.metrics if METRICS[n].kind == "accuracy"]
    costs = [n for n in table.metrics if METRICS[n].kind == "cost"]
    if accuracy:
        families.append(_accuracy_family(table, scale, rows, accuracy, recipe.seed_spread,
                                         published if table.key != PUBLISHED else None))
    if costs:
        families.append(_cost_family(table, rows, costs, at_paper_regime))
    families += [f for f in (_statistic_family(table, rows), _size_family(table, rows),
                             _inference_family(table, rows), _quantization_family(table, rows)) if f is not None]
    plot: dict = {}
    for name in costs + list(INFERENCE):
        for row in table.rows:
            mean, low, high = rows[row.name].ratio(name)
            paper = _paper_ratio(table, row, name)
            if mean is not None or paper is not None:
                plot.setdefault(name, {}).setdefault(row.group, {})[row.name] = (mean, low, high, paper)
    devices = sorted({d for r in rows.values() if len(r.metrics) for d in r.metrics.device.dropna()})
    points = [{"table": table.key, "row": r.row.name, "rep": r.row.rep, "arch": r.row.arch,
               **{n: r.mean(n) for n in ("top1", "time_per_batch", "train_memory", "latency")}}
              for r in rows.values() if r.seeds]
    departures = [f"{row.name}: " + ", ".join(f"{k} {v}" for k, v in row.recipe[scale].items()
                                              if getattr(recipe, k) != v)
                  for row in table.rows if any(getattr(recipe, k) != v for k, v in row.recipe.get(scale, {}).items())]
    deployed = []
    for r in rows.values():  # a dense run evaluates its model again after deploying it: the two must agree
        for name in ("map", "miou") if len(r.metrics) else ():
            trained, again = r.values(name).value, r.values(f"{name}_deployed").value
            if len(trained) and len(again):
                same = all(abs(a - b) <= 1e-6 for a, b in zip(trained, again))
                deployed.append(f"{r.row.name}: {METRICS[name].label} {trained.mean():.2f} trained, "
                                f"{again.mean():.2f} deployed ({'equal' if same else 'DIFFERENT'})")
    histograms = {}
    for r in rows.values():
        series = {position: r.values(f"kernel_hist_{position}") for position in HISTOGRAM_POSITIONS}
        if len(r.metrics) and all(len(v) for v in series.values()):  # one seed measures one kernel: its mean
            histograms[r.row.name] = {"range": r.mean("kernel_hist_range"), **{
                position: v.groupby("step").value.mean().sort_index().tolist() for position, v in series.items()}}
    if table.runner == "dense":
        text = "; ".join(f"{k} {v}" for k, v in recipe.switches().items()) + (
            f"; {recipe.batch} image(s) per device" if recipe.batch else "; the config's batch")
    else:
        text = (f"dataset {recipe.dataset}, {recipe.resolution}x{recipe.resolution}, batch {recipe.batch}, "
                f"{recipe.epochs} epoch(s)" + (f" (at most {recipe.max_iters} iterations)" if recipe.max_iters else ""))
    return Section(scale, recipe.as_dict(), regime, devices, families,
                   [judge_claim(c, table, rows, at_paper_regime) for c in table.claims]
                   + [judge_ordering(o, table, rows) for o in table.orderings],
                   [r.where() for r in rows.values()], plot, table.chain, points, superseded, busy, departures, text, deployed,
                   histograms)


def build_table_report(table: Table, store) -> dict:
    """Everything a report of ``table`` shows, read from ``store`` (None: no database yet)."""
    if store is None:
        runs, metrics, envs = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    else:
        runs, metrics, envs = (store.runs_frame(table.key), store.metrics_frame(table.key),
                               store.environments_frame(table.key))
    report = {"table": table, "sections": [], "runs": [], "environments": [], "never_run": runs.empty,
              "runnable": bool(table.recipes)}
    if runs.empty:
        report["printed"] = printed_values(table)
        return report
    published = published_weights(store)
    for scale in [s for s in table.scales if s in set(runs.scale)]:
        report["sections"].append(build_section(table, scale, runs, metrics, envs, lineage(store, table.key),
                                                published))
    report["runs"] = runs[["id", "run_key", "row_name", "scale", "seed", "status", "attempt", "executor",
                           "diverged_step", "error"]].to_dict("records")
    for run in report["runs"]:
        run["error"] = first_line(run["error"])
    if not envs.empty:
        cols = [c for c in ENVIRONMENT if c in envs.columns]
        report["environments"] = envs[cols].astype(object).where(envs[cols].notna(), None).drop_duplicates() \
            .to_dict("records")
    return report


def printed_values(table: Table) -> dict:
    """The paper's values of every row, as printed (what a report shows before anything ran): columns and rows."""
    columns = ["row"] + [METRICS[m].label for m in table.metrics] + ["status"]
    rows = []
    for row in table.rows:
        values = {METRICS[m].label: row.paper[m].text if m in row.paper else "–" for m in table.metrics}
        rows.append({"row": row.name, **values, "status": f"declared: {row.declared}" if row.declared else ""})
    if not any(r["status"] for r in rows):
        columns.remove("status")
    return {"columns": columns, "rows": rows}


def leaderboard(reports: list[dict]) -> list[dict]:
    """Every method measured on one recipe side by side: per (scale, recipe), the rows of all tables that ran it."""
    boards: dict = {}
    for report in reports:
        for section in report["sections"]:
            if "dataset" not in section.recipe:  # a dense table's runs: no classification recipe to share
                continue
            recipe = {k: section.recipe.get(k) for k in ("dataset", "resolution", "batch", "epochs", "cost_batch",
                                                          "cost_resolution")}
            key = (section.scale, tuple(sorted(recipe.items())))
            board = boards.setdefault(key, {"scale": section.scale, "recipe": recipe, "points": []})
            board["points"] += section.points
    return list(boards.values())
