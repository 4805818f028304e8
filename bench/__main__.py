"""Run the performance suite and print one line per figure: `<name>: ratio=<x> goal=<op><y> met|missed`.

    python -m bench [--quick] [--only throughput,overhead,checkpoint,scaling,data,gpu,packing,data_check,memory,search] [--json results.json]

Absolute figures (seconds, percent) print as `value_s=` / `value_pct=` with the baseline beside them.
Each run records the machine and package versions with the figures (--json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import data_check, gpu, memory, packing, perf, search

SUITES = {"throughput": perf.throughput, "overhead": perf.overhead, "checkpoint": perf.checkpoint_cost,
          "scaling": perf.scaling, "data": perf.data_cache, "gpu": gpu.gpu_figures,
          "memory": memory.memory_figures}
SUITES |= {"packing": packing.packing, "data_check": data_check.data_check, "search": search.search_figures}


def environment() -> dict:
    import os
    from importlib.metadata import version

    packages = {name: version(name) for name in ("torch", "ray", "deepspeed", "peft", "transformers")}
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), **packages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a few minutes in all")
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated suites (default: all)")
    parser.add_argument("--json", type=Path, help="write the figures, machine and versions here")
    parser.add_argument("--workdir", type=Path, help="keep workloads and runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SUITES)
    if unknown:
        parser.error(f"--only: unknown suite(s) {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    bench = perf.Bench(root=root, steps=40 if args.quick else 100)
    print(f"# bench: {environment()} | {bench.steps} steps per contender | work in {root}", flush=True)
    figures, started = [], time.monotonic()
    for name in args.only.split(","):
        for figure in SUITES[name](bench):
            figures.append(figure)
            print(figure.line(), flush=True)
    print(f"# bench: {len(figures)} figures in {time.monotonic() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "steps": bench.steps, "figures": [
            {**figure.__dict__, "met": figure.met} for figure in figures]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
