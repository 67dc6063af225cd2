"""Paper tables as declarations. ``get_table("table4")`` resolves a bare name to the first paper (OREPA)."""

from __future__ import annotations

from . import orepa
from .base import SCALES, PaperValue, Row, Table

PAPERS = {"orepa": orepa.TABLES}  # in the order of DESIGN.md; the first paper owns bare table names
TABLES: dict[str, Table] = {t.key: t for tables in PAPERS.values() for t in tables}


def get_table(name: str) -> Table:
    """``orepa.table4`` or a bare ``table4`` (the first paper that has it). Unknown names raise ``KeyError``."""
    if name in TABLES:
        return TABLES[name]
    for paper in PAPERS:
        key = f"{paper}.{name}"
        if key in TABLES:
            return TABLES[key]
    raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")


__all__ = ["SCALES", "PAPERS", "TABLES", "PaperValue", "Row", "Table", "get_table"]
