"""Training-cost benchmark: where do OREPA's savings hold? (OREPA Sec. 4.2-4.3, issue: paper vs small regime)

    python -m runners.cost_benchmark                      # paper regime 64x224x224 and small regime 16x128x128
    python -m runners.cost_benchmark --cell 16x128 --cell 32x160 --arch resnet18 --cap-gb 20

For each cell (batch x resolution) and each method (plain, DBB, OREPA online, OREPA offline_bn) it measures, with the
probes and the comparison every suite uses (runners/probes.py, compare_costs): step time (median and IQR, the
methods' steps interleaved in this one process) and peak training memory (capped children one after the other; an OOM
is a result). It prints each method's ratio to the plain network (median of per-step ratios, interquartile interval),
OREPA's extra memory as a fraction of DBB's, and how busy the machine was meanwhile. ``--isolated`` times each method
alone in a fresh child process instead (as separate training scripts run; ratios of medians). Numbers, not a
pass/fail test; ``--json`` keeps them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from backbones import build_classifier, deploy
from backbones.networks import ARCHS

from .probes import (CostSetting, Load, compare_costs, device_name, probe_train_time_isolated, ratio_of_medians,
                     start_clean_fork_server)

METHODS = {"none": ("none", None), "dbb": ("dbb", None), "orepa": ("orepa", None),
           "orepa offline_bn": ("orepa", "offline_bn"),
           # RepOptimizers (a RepVGG-layout arch, e.g. --arch repoptvgg_b1): the RepOpt target steps with its
           # RepOptimizer, "none" (the same conv+BN net with plain SGD) is the baseline; "repvgg layout" is RepVGG
           # written as the RepOptimizers repo's baseline block reads (below), beside ours
           "repvgg": ("repvgg", None), "repopt": ("repopt", None), "repvgg layout": "layout"}
DEFAULT_METHODS = ["none", "dbb", "orepa", "orepa offline_bn"]
REGIMES = {"paper": (64, 224), "small": (16, 128)}


class LayoutBlock(nn.Module):
    """The RepOptimizers repo's RepVGG baseline block as its layout reads (official-code notes Sec. 4.2), written here
    for the benchmark only: BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x) where in == out and stride 1], then a ReLU that
    is not in place. It answers whether this suite's RepVGG (the same parameters; an in-place ReLU) trains at the
    official structure's cost."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv_3x3, self.bn_3x3 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv_1x1, self.bn_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
        self.bn_identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.bn_3x3(self.conv_3x3(x)) + self.bn_1x1(self.conv_1x1(x))
        if self.bn_identity is not None:
            out += self.bn_identity(x)
        return self.relu(out)


def layout_repvgg(arch: str, num_classes: int = 1000) -> nn.Module:
    """``arch`` (a RepVGG-layout arch without groups) built of :class:`LayoutBlock`: stem, four stages, GAP, linear."""
    spec = ARCHS[arch]
    if spec.family != "repvgg" or spec.kwargs.get("override_groups"):
        raise ValueError(f"'repvgg layout' needs a RepVGG-layout arch without groups, not {arch}")
    layers, widths = spec.kwargs["layers"], spec.kwargs["widths"]
    cin = min(64, int(64 * widths[0]))
    blocks = [LayoutBlock(3, cin, 2)]
    for i, n in enumerate(layers):
        planes = int(64 * 2 ** i * widths[i]) if i < 3 else int(512 * widths[3])
        for j in range(n):
            blocks.append(LayoutBlock(cin, planes, 2 if j == 0 else 1))
            cin = planes
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def measure_cell(arch: str, batch: int, resolution: int, warmup: int, steps: int, cap_gb: float,
                 device: str, methods: list[str], isolated: bool = False) -> tuple[dict, Load]:
    """Every method at one cell, with the probes and the comparison every suite uses (probes.compare_costs): memory
    in fresh children one after the other, training steps interleaved in this process, ratios to plain ``none``.
    ``isolated``: each method's steps timed alone in a fresh child instead (one after the other, as separate
    training scripts would run), ratios of medians."""
    factories = {name: functools.partial(layout_repvgg, arch) if METHODS[name] == "layout" else
                 functools.partial(build_classifier, arch, METHODS[name][0], 1000, METHODS[name][1])
                 for name in methods}
    setting = CostSetting(batch, resolution, 1000, device, warmup, steps, cap_gb)
    probes = ("train_memory",) if isolated else ("train_memory", "time_per_batch")
    results, load = compare_costs(factories, "none", setting, deploy, probes)
    if isolated:  # the timing children are the fork server's: their CPU time is not told from other processes' here
        load = Load(load_before=os.getloadavg()[0])
        alone = {name: probe_train_time_isolated(factory, batch, resolution, 1000, device, warmup, steps, cap_gb)
                 for name, factory in factories.items()
                 if not next(m for m in results[name] if m.name == "train_memory").oom}
        load.load_after = os.getloadavg()[0]
        for name, measurement in alone.items():
            results[name].append(measurement)
            if "none" in alone:
                results[name].append(ratio_of_medians("time_per_batch_ratio", measurement, alone["none"], "none"))
    cell = {}
    for name, measurements in results.items():
        m = {x.name: x for x in measurements}
        memory, timed = m["train_memory"], m["time_per_batch"]
        ratio = {key: m[key] for key in ("time_per_batch_ratio", "train_memory_ratio") if key in m}
        cell[name] = {"memory_gib": memory.value, "oom": memory.oom, "memory_method": memory.method,
                      "memory_threads": memory.threads, "time_s": timed.value, "time_method": timed.method,
                      "time_iqr_s": timed.extra.get("time_per_batch_iqr"),
                      "time_x": ratio["time_per_batch_ratio"].value if "time_per_batch_ratio" in ratio else None,
                      "time_x_q1": ratio["time_per_batch_ratio"].extra["time_per_batch_ratio_q1"]
                      if "time_per_batch_ratio" in ratio else None,
                      "time_x_q3": ratio["time_per_batch_ratio"].extra["time_per_batch_ratio_q3"]
                      if "time_per_batch_ratio" in ratio else None,
                      "memory_x": ratio["train_memory_ratio"].value if "train_memory_ratio" in ratio else None}
    return cell, load


def orepa_extra_memory_over_dbb(cell: dict) -> float | None:
    """OREPA's extra training memory (over plain) as a fraction of DBB's (the paper: ~0.3)."""
    if "dbb" not in cell or "orepa" not in cell:
        return None
    base = cell["none"]["memory_gib"] or 0
    dbb_extra = (cell["dbb"]["memory_gib"] or 0) - base
    return ((cell["orepa"]["memory_gib"] or 0) - base) / dbb_extra if dbb_extra > 0 else None


def repopt_speedup_over_repvgg(cell: dict) -> float | None:
    """RepVGG's step time over the RepOpt target's (RepOptimizers Table 2: 380 / 213 samples/s = 1.78x at BS 32)."""
    if "repvgg" not in cell or "repopt" not in cell or not cell["repopt"]["time_s"] or not cell["repvgg"]["time_s"]:
        return None
    return cell["repvgg"]["time_s"] / cell["repopt"]["time_s"]


def main(argv=None) -> int:
    start_clean_fork_server()  # first, while this process is fresh: memory children then use all threads
    parser = argparse.ArgumentParser(prog="python -m runners.cost_benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--cell", action="append", metavar="BATCHxRES",
                        help="e.g. 16x128; repeat to sweep (default: the paper and the small regime)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="which methods (plain 'none' is always the baseline)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cap-gb", type=float, default=20.0, help="memory cap of each CPU memory probe")
    parser.add_argument("--isolated", action="store_true",
                        help="time each method alone in a fresh process (as separate training scripts), not "
                             "interleaved in one")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    try:
        cells = [tuple(int(v) for v in c.lower().split("x")) for c in args.cell] if args.cell else \
            list(REGIMES.values())
    except ValueError:
        print(f"cost_benchmark: error: cells are BATCHxRES, e.g. 16x128, got {args.cell}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    console = Console(width=140)
    results = []
    for batch, resolution in cells:
        console.print(f"[bold]{args.arch} at {batch} x {resolution}x{resolution} on {device_name(device)}")
        methods = ["none"] + [m for m in args.methods if m != "none"]
        cell, load = measure_cell(args.arch, batch, resolution, args.warmup, args.steps, args.cap_gb, device,
                                  methods, args.isolated)
        table = Table()
        for column in ("method", "time/step (s)", "IQR (s)", "x plain [IQR]", "peak memory (GiB)", "x plain"):
            table.add_column(column)
        for name, m in cell.items():
            ratio = "" if m["time_x"] is None else f"{m['time_x']:.2f} [{m['time_x_q1']:.2f}-{m['time_x_q3']:.2f}]"
            table.add_row(name, "–" if m["time_s"] is None else f"{m['time_s']:.3f}",
                          "" if m["time_iqr_s"] is None else f"{m['time_iqr_s']:.3f}", ratio,
                          f"OOM (cap {args.cap_gb:g})" if m["oom"] else f"{m['memory_gib']:.2f}",
                          "" if m["memory_x"] is None else f"{m['memory_x']:.2f}")
        console.print(table)
        extra = orepa_extra_memory_over_dbb(cell)
        if extra is not None:
            console.print(f"OREPA's extra memory / DBB's extra memory: {extra:.2f}")
        speedup = repopt_speedup_over_repvgg(cell)
        if speedup is not None:
            console.print(f"RepOpt's speed-up over RepVGG (step time ratio): {speedup:.2f}x; RepOpt / plain target: "
                          f"{cell['repopt']['time_x']:.3f}x")
        console.print(("[yellow]warning: the machine was busy: " if load.busy else "machine: ") + load.describe())
        results.append({"arch": args.arch, "batch": batch, "resolution": resolution, "device": device_name(device),
                        "threads": torch.get_num_threads(), "timing": "isolated" if args.isolated else "interleaved",
                        "cell": cell, "orepa_extra_memory_over_dbb": extra,
                        "repopt_speedup_over_repvgg": speedup,
                        "load": {"before": load.load_before, "after": load.load_after,
                                 "other_cpu_share": load.other_share, "busy": load.busy}})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
