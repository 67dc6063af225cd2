"""Render report data (reports.build) as markdown or a self-contained HTML page (escaped, plots inlined)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from jinja2 import Environment, FileSystemLoader

TEMPLATES = Path(__file__).parent / "templates"


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _verdict_class(value) -> str:
    return {"yes": "yes", "no": "no"}.get(str(value), "na" if str(value).startswith("n/a") else "")


def _environment(autoescape: bool) -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=autoescape,
                      trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    env.filters["md"] = _md_cell
    env.filters["verdict_class"] = _verdict_class
    return env


def render_markdown(report: dict) -> str:
    approximate = any(v.approximate for row in report["table"].rows for v in row.paper.values())
    return _environment(False).get_template("table.md.j2").render(
        **report, approximate=approximate)


def cost_plot(section) -> str | None:
    """Grouped bars of measured vs paper cost ratios (to each group's baseline), one panel per cost metric; for
    Figure 8-style tables (groups as curves over components) these are the cost curves. Base64 PNG or None."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for rows in section.plot_groups.values() for values in rows.values() for m in values})
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for group, rows in section.plot_groups.items():
            names = list(rows)
            measured = [rows[n][metric][0] for n in names]
            paper = [rows[n][metric][1] for n in names]
            x = range(len(names))
            ax.plot(x, [math.nan if v is None else v for v in measured], "o-", label=f"{group} measured")
            ax.plot(x, [math.nan if v is None else v for v in paper], "x--", label=f"{group} paper")
            ax.set_xticks(list(x), [n.split("/", 1)[-1] for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric}: ratio to baseline")
        ax.legend(fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def render_html(reports: list[dict]) -> str:
    for report in reports:
        for section in report["sections"]:
            section.plot = cost_plot(section)
    return _environment(True).get_template("page.html.j2").render(reports=reports)
