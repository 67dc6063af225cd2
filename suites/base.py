"""Declarations of paper tables: rows x metrics, the paper's printed values, the recipe at each scale, the baseline
row of each group and the tolerance for "reproduced". Suites are data: they import nothing from runners, results or
reports."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

SCALES = ("smoke", "mini", "paper")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    label: str
    kind: str  # "accuracy" or "cost"
    higher_is_better: bool


METRICS = {m.name: m for m in (
    MetricSpec("top1", "%", "Top-1 acc", "accuracy", True),
    MetricSpec("map", "%", "mAP", "accuracy", True),
    MetricSpec("miou", "%", "mIoU", "accuracy", True),
    MetricSpec("train_memory", "GB", "Train memory", "cost", False),
    MetricSpec("time_per_batch", "s", "Time/batch", "cost", False),
    MetricSpec("time_per_50_steps", "min", "Time (min/50 steps)", "cost", False),
)}


@dataclass(frozen=True)
class PaperValue:
    """A number exactly as printed (``text``, e.g. "4.2G", "0.086s", "NaN"), where it is printed, and whether it
    was read off a figure (then ``approximate``)."""

    text: str
    source: str
    approximate: bool = False

    @property
    def value(self) -> float | None:
        """The number, or None for "-" ; "NaN" is float('nan') (the paper's diverged runs)."""
        if self.text.strip().lower() == "nan":
            return float("nan")
        match = re.search(r"[-+]?\d+(?:\.\d+)?", self.text)
        return float(match.group(0)) if match else None


@dataclass(frozen=True)
class Row:
    name: str
    arch: str
    rep: str
    variant: str | dict | None = None
    group: str = ""
    paper: dict[str, PaperValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """How a table is measured at one scale. Accuracy: a training run through MMEngine's Runner (SGD, warm-up,
    cosine; the paper's recipe at paper scale). Cost: the probes of runners/probes.py at ``cost_batch`` x
    ``cost_resolution``."""

    dataset: str                 # synthetic | digits | imagenet | cifar10 | cifar100
    resolution: int
    batch: int                   # per device
    epochs: int = 1
    max_iters: int | None = None  # cap on training iterations (smoke)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    cost_batch: int = 2
    cost_resolution: int = 32
    cost_warmup: int = 1
    cost_steps: int = 2
    memory_cap_gb: float = 16.0   # CPU memory probes run under this cap; beyond it the result is "OOM"
    latency_batch: int = 1
    throughput_batch: int = 128
    train_accuracy: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Table:
    paper: str
    name: str
    title: str
    source: str
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]
    recipes: dict[str, Recipe]
    baselines: dict[str, str] = field(default_factory=dict)  # group -> the row whose cost ratios are 1.0
    paper_regime: tuple[int, int] | None = (64, 224)          # per-device batch x resolution of the paper's costs
    accuracy_tolerance: float = 0.3                            # points of top-1 (DESIGN.md, Scales)
    runner: str = "classification"                            # classification | dense (dense: declared only)
    claims: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.paper}.{self.name}"

    @property
    def scales(self) -> tuple[str, ...]:
        return tuple(s for s in SCALES if s in self.recipes)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.key} has no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def baseline_of(self, row: Row) -> str | None:
        return self.baselines.get(row.group)
