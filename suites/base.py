"""Declarations of paper tables: rows x metrics, the paper's printed values, and which scales a table supports.

Suites are data: they import nothing from runners, results or reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCALES = ("smoke", "mini", "paper")


@dataclass(frozen=True)
class PaperValue:
    """A number exactly as printed (``text``), parsed (``value``, ``unit``), and where it is printed."""

    text: str
    source: str
    approximate: bool = False  # read from a figure

    @property
    def value(self) -> float | None:
        match = re.match(r"^\s*([-+]?\d+(?:\.\d+)?)", self.text)
        return float(match.group(1)) if match else None  # "NaN" and "-" have no value

    @property
    def unit(self) -> str:
        return {"G": "GB", "s": "s", "M": "M"}.get(self.text.strip()[-1:], "%")


@dataclass(frozen=True)
class Row:
    name: str
    arch: str
    rep: str
    variant: str | dict | None = None
    group: str = ""
    paper: dict[str, PaperValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    paper: str
    name: str
    title: str
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]
    baselines: dict[str, str] = field(default_factory=dict)  # group -> row name that ratios are taken against
    scales: tuple[str, ...] = SCALES

    @property
    def key(self) -> str:
        return f"{self.paper}.{self.name}"

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.key} has no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")
