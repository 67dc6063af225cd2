"""Render report data (reports.build) as markdown, or as a self-contained HTML site: ``index.html``, a page per
table and a leaderboard, with inline CSS and inline PNG plots, readable without a server. Every user-controlled
string is escaped as HTML entities, in markdown as in HTML."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from jinja2 import Environment, FileSystemLoader

from .build import HISTOGRAM_POSITIONS, LABELS, leaderboard

TEMPLATES = Path(__file__).parent / "templates"


def md_cell(value) -> str:
    """A markdown table cell: HTML entities escaped (a run's error is user-controlled), pipes and newlines too."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def _verdict_class(value) -> str:
    return {"yes": "yes", "no": "no", "held": "yes", "did not hold": "no"}.get(
        str(value), "na" if str(value).startswith("n/a") else "")


def _environment(autoescape: bool) -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=autoescape,
                      trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    env.filters["md"] = md_cell
    env.filters["verdict_class"] = _verdict_class
    return env


def render_markdown(report: dict) -> str:
    approximate = any(v.approximate for row in report["table"].rows for v in row.paper.values())
    return _environment(False).get_template("table.md.j2").render(**report, approximate=approximate)


# ---- plots ------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _colours(n: int) -> list:
    """n distinguishable colours (tab10, then tab20)."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _nan(v):
    return math.nan if v is None else v


def cost_bars(section) -> str | None:
    """Bars of the measured ratio to each group's baseline (error bars: the spread) beside the paper's ratio
    (hatched), one panel per cost metric, one colour per group, one tick per row. Base64 PNG, or None."""
    if not section.plot:
        return None
    plt = _pyplot()
    metrics = list(section.plot)
    groups = list(dict.fromkeys(g for m in metrics for g in section.plot[m]))
    colour = dict(zip(groups, _colours(len(groups))))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.55 * sum(len(section.plot[metrics[0]].get(g, {}))
                                                                          for g in groups) + 2), 3.2 * len(metrics)),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        x, ticks = 0, []
        for group in groups:
            for name, (mean, low, high, paper) in section.plot[metric].get(group, {}).items():
                err = [[max(mean - low, 0)], [max(high - mean, 0)]] if None not in (mean, low, high) else None
                ax.bar(x - 0.2, _nan(mean), 0.4, color=colour[group], yerr=err, capsize=3,
                       label=f"{group} measured" if name == next(iter(section.plot[metric][group])) else None)
                ax.bar(x + 0.2, _nan(paper), 0.4, color=colour[group], alpha=0.35, hatch="//", edgecolor="black",
                       label=f"{group} paper" if name == next(iter(section.plot[metric][group])) else None)
                ticks.append(name)
                x += 1
        ax.set_xticks(range(len(ticks)), ticks, rotation=35, ha="right", fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel("x baseline")
        ax.set_title(f"{LABELS.get(metric, metric)}: ratio to the group's baseline (hatched: paper)", fontsize=9)
        ax.legend(fontsize=6, ncol=min(4, 2 * len(groups)))
    fig.tight_layout()
    return _png(fig)


def chain_curves(section) -> str | None:
    """Figure-8 style: per cost metric, one curve per group over the components added (solid: measured ratio,
    dashed: the paper's)."""
    if not section.chain or not section.plot:
        return None
    plt = _pyplot()
    metrics = list(section.plot)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        groups = list(section.plot[metric])
        for group, c in zip(groups, _colours(len(groups))):
            rows = section.plot[metric][group]
            steps = [name.split("/", 1)[-1] for name in rows]
            ax.plot(steps, [_nan(v[0]) for v in rows.values()], "o-", color=c, label=f"{group} measured")
            ax.plot(steps, [_nan(v[3]) for v in rows.values()], "x--", color=c, label=f"{group} paper")
        ax.set_title(f"{LABELS.get(metric, metric)} as components are added", fontsize=9)
        ax.set_ylabel("x baseline")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


def kernel_histograms(section) -> str | None:
    """RepOptimizers Figures 3 and 5: the sampled kernel's parameter distribution per row, over all its positions,
    the centre and the eight surrounding ones (one panel each; each row on its own bins, in weight units)."""
    if not section.histograms:
        return None
    plt = _pyplot()
    rows = list(section.histograms)
    fig, axes = plt.subplots(1, len(HISTOGRAM_POSITIONS), figsize=(5 * len(HISTOGRAM_POSITIONS), 3.3), squeeze=False)
    for ax, position in zip(axes[0], HISTOGRAM_POSITIONS):
        for row, c in zip(rows, _colours(len(rows))):
            shares, m = section.histograms[row][position], section.histograms[row]["range"]
            width = 2 * m / len(shares)
            ax.stairs(shares, [-m + i * width for i in range(len(shares) + 1)], color=c, label=row)
        ax.set_title(f"{position} positions", fontsize=9)
        ax.set_xlabel("parameter value", fontsize=8)
        ax.set_ylabel("share of parameters", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


SCATTER_PAIRS = (("time_per_batch", "top1"), ("train_memory", "top1"), ("latency", "top1"),
                 ("time_per_batch", "train_memory"), ("latency", "time_per_batch"))
AXIS = {"top1": "top-1 (%)", "time_per_batch": "training time per batch (s)", "train_memory": "training memory (GiB)",
        "latency": "deploy latency (s)"}


def scatters(points: list[dict]) -> list[tuple[str, str]]:
    """(title, base64 PNG) per pair of measures that at least two rows have: one colour per re-param method."""
    plt = _pyplot()
    reps = list(dict.fromkeys(p["rep"] for p in points))
    colour = dict(zip(reps, _colours(len(reps))))
    out = []
    for x, y in SCATTER_PAIRS:
        have = [p for p in points if p.get(x) is not None and p.get(y) is not None
                and not math.isnan(p[x]) and not math.isnan(p[y])]
        if len(have) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for rep in reps:
            mine = [p for p in have if p["rep"] == rep]
            if mine:
                ax.scatter([p[x] for p in mine], [p[y] for p in mine], color=colour[rep], label=rep, s=25)
        for p in have:
            ax.annotate(p["row"], (p[x], p[y]), fontsize=5, alpha=0.8, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(AXIS[x])
        ax.set_ylabel(AXIS[y])
        ax.legend(fontsize=6, title="rep", title_fontsize=6)
        fig.tight_layout()
        out.append((f"{AXIS[y]} vs {AXIS[x]}", _png(fig)))
    return out


# ---- the site ---------------------------------------------------------------------------------------------------------

def page_name(table) -> str:
    return f"{table.key}.html"


def render_table_page(report: dict) -> str:
    for section in report["sections"]:
        section.bars, section.curves = cost_bars(section), chain_curves(section)
        section.histogram_png = kernel_histograms(section)
    return _environment(True).get_template("table.html.j2").render(**report, page_name=page_name)


def render_leaderboard(reports: list[dict]) -> str:
    boards = leaderboard(reports)
    for board in boards:
        board["scatters"] = scatters(board["points"])
    return _environment(True).get_template("leaderboard.html.j2").render(boards=boards, page_name=page_name)


def render_index(reports: list[dict]) -> str:
    return _environment(True).get_template("index.html.j2").render(reports=reports, page_name=page_name)


def render_site(reports: list[dict]) -> dict[str, str]:
    """File name -> HTML: index.html, leaderboard.html and one page per table."""
    site = {"index.html": render_index(reports), "leaderboard.html": render_leaderboard(reports)}
    for report in reports:
        site[page_name(report["table"])] = render_table_page(report)
    return site
