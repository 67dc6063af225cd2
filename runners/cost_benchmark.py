"""Training-cost benchmark: where do OREPA's savings hold? (OREPA Sec. 4.2-4.3, issue: paper vs small regime)

    python -m runners.cost_benchmark                      # paper regime 64x224x224 and small regime 16x128x128
    python -m runners.cost_benchmark --cell 16x128 --cell 32x160 --arch resnet18 --cap-gb 20

For each cell (batch x resolution) and each method (plain, DBB, OREPA online, OREPA offline_bn) it measures, with the
probes every suite uses: step time (median and IQR of interleaved steps) and peak training memory (a capped child
process; an OOM is a result). It prints ratios to the plain network and OREPA's extra memory as a fraction of DBB's.
Numbers, not a pass/fail test; ``--json`` keeps them.
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

from backbones import build_classifier

from .probes import device_name, probe_train_memory, probe_train_time_interleaved

METHODS = {"none": ("none", None), "dbb": ("dbb", None), "orepa": ("orepa", None),
           "orepa offline_bn": ("orepa", "offline_bn")}
REGIMES = {"paper": (64, 224), "small": (16, 128)}


def measure_cell(arch: str, batch: int, resolution: int, warmup: int, steps: int, cap_gb: float,
                 device: str, methods: list[str]) -> dict:
    factories = {name: functools.partial(build_classifier, arch, METHODS[name][0], 1000, METHODS[name][1])
                 for name in methods}
    memory = {name: probe_train_memory(f, batch, resolution, 1000, device, 1, cap_gb) for name, f in factories.items()}
    fitting = {name: f() for name, f in factories.items() if not memory[name].oom}
    times = probe_train_time_interleaved(fitting, batch, resolution, 1000, device, warmup, steps)
    return {name: {"memory_gib": memory[name].value, "oom": memory[name].oom, "memory_method": memory[name].method,
                   "time_s": times[name].value if name in times else None,
                   "time_iqr_s": times[name].extra["time_per_batch_iqr"] if name in times else None}
            for name in methods}


def ratios(cell: dict) -> dict:
    base = cell["none"]
    out = {}
    for name, m in cell.items():
        out[name] = {"time_x": m["time_s"] / base["time_s"] if m["time_s"] and base["time_s"] else None,
                     "memory_x": m["memory_gib"] / base["memory_gib"] if m["memory_gib"] and base["memory_gib"]
                     else None}
    if "dbb" in cell and "orepa" in cell:
        dbb_extra = (cell["dbb"]["memory_gib"] or 0) - (base["memory_gib"] or 0)
        orepa_extra = (cell["orepa"]["memory_gib"] or 0) - (base["memory_gib"] or 0)
        out["orepa_extra_memory_over_dbb"] = orepa_extra / dbb_extra if dbb_extra > 0 else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.cost_benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--cell", action="append", metavar="BATCHxRES",
                        help="e.g. 16x128; repeat to sweep (default: the paper and the small regime)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="which methods (plain 'none' is always the baseline)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cap-gb", type=float, default=20.0, help="memory cap of each CPU memory probe")
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
        cell = measure_cell(args.arch, batch, resolution, args.warmup, args.steps, args.cap_gb, device, methods)
        r = ratios(cell)
        table = Table()
        for column in ("method", "time/step (s)", "IQR (s)", "x plain", "peak memory (GiB)", "x plain"):
            table.add_column(column)
        for name, m in cell.items():
            table.add_row(name, "OOM" if m["oom"] else f"{m['time_s']:.3f}",
                          "" if m["oom"] else f"{m['time_iqr_s']:.3f}",
                          "" if r[name]["time_x"] is None else f"{r[name]['time_x']:.2f}",
                          f"OOM (cap {args.cap_gb:g})" if m["oom"] else f"{m['memory_gib']:.2f}",
                          "" if r[name]["memory_x"] is None else f"{r[name]['memory_x']:.2f}")
        console.print(table)
        extra = r.get("orepa_extra_memory_over_dbb")
        console.print(f"OREPA's extra memory / DBB's extra memory: {'n/a' if extra is None else f'{extra:.2f}'}")
        results.append({"arch": args.arch, "batch": batch, "resolution": resolution, "device": device_name(device),
                        "threads": torch.get_num_threads(), "cell": cell, "ratios": r})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
