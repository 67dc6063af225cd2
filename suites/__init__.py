"""Paper tables as declarations. ``get_table("table4")`` resolves a bare name to the first paper that has it
(OREPA, the first paper of DESIGN.md)."""

from __future__ import annotations

from . import dyrep, orepa, repnext, repopt
from .base import METRICS, OPTIMIZERS, SCALES, Claim, DenseRecipe, DyRep, MetricSpec, Ordering, PaperValue, Recipe, Row, Scales, Structure, Table

PAPERS = {"orepa": orepa.TABLES, "repopt": repopt.TABLES, "dyrep": dyrep.TABLES, "repnext": repnext.TABLES}  # in DESIGN.md's order; the first paper owns bare table names
TABLES: dict[str, Table] = {t.key: t for tables in PAPERS.values() for t in tables}


def get_table(name: str) -> Table:
    """``orepa.table4`` or a bare ``table4``. Unknown names raise ``KeyError`` with the known ones."""
    if name in TABLES:
        return TABLES[name]
    for paper in PAPERS:
        if f"{paper}.{name}" in TABLES:
            return TABLES[f"{paper}.{name}"]
    raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")


__all__ = ["METRICS", "OPTIMIZERS", "SCALES", "PAPERS", "TABLES", "Claim", "DenseRecipe", "DyRep", "MetricSpec", "Ordering", "PaperValue", "Recipe", "Row", "Scales", "Structure", "Table",
           "get_table"]
