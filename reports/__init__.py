"""Reports from the results store only (a report never runs anything): markdown per table, or a self-contained HTML
site (index.html, leaderboard.html, a page per table)."""

from __future__ import annotations

from pathlib import Path

from .build import build_table_report
from .render import render_markdown, render_site


def open_store(url: str):
    """The store at ``url``, or None when it holds no results yet; a missing SQLite file is a StoreError (a report
    never creates a database)."""
    from results import SchemaMissing, Store
    try:
        return Store(url, migrate=False)
    except SchemaMissing:
        return None


def write_reports(tables, url: str, fmt: str, out: Path) -> list[Path]:
    store = open_store(url)
    try:
        reports = [build_table_report(table, store) for table in tables]
    finally:
        if store is not None:
            store.close()
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        paths = []
        for report in reports:
            path = out / f"{report['table'].key}.md"
            path.write_text(render_markdown(report))
            paths.append(path)
        return paths
    paths = []
    for name, page in render_site(reports).items():  # index.html first
        (out / name).write_text(page)
        paths.append(out / name)
    return paths


__all__ = ["build_table_report", "open_store", "render_markdown", "render_site", "write_reports"]
