"""ASHA vs a full grid over the same space (rank × LoRA+ ratio), in one run on this machine.

Both searches run the same 9 configurations of the built-in tiny Llama on the arithmetic data; the
grid runs every trial to the end (FIFO), ASHA stops poor trials at its rungs. Printed: each search's
best eval loss and the trial-steps it consumed, as ratios, and Tune's bookkeeping overhead (search
wall time ÷ the sum of its trials' own training time).

    python bench/tune_asha_vs_grid.py [--steps 80] [--grace 5] [--reduction-factor 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import orchestrator
from orchestrator.spec import validate_spec


def search_spec(name: str, scheduler: dict, steps: int, eval_every: int, storage_uri: str):
    return validate_spec({
        "name": "bench",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"path": "builtin:arithmetic", "max_length": 32},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "train": {"max_steps": steps, "batch_size": 8, "eval_every": eval_every, "eval_batches": 2,
                  "checkpoint_every": steps, "log_every": eval_every},
        "scaling": {"num_workers": 1},
        "storage": {"uri": storage_uri},
        "tune": {"name": name, "num_samples": 1, "scheduler": scheduler,
                 "space": {"adapter.r": {"grid": [4, 8, 16]}, "optim.lora_plus_ratio": {"grid": [1, 4, 16]}}},
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--grace", type=int, default=5)
    parser.add_argument("--reduction-factor", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        uri = f"file://{scratch}"
        os.environ.setdefault("ORCHESTRATOR_STORE_DIR", scratch)
        outcomes = {}
        asha_scheduler = {"type": "asha", "grace_period": args.grace, "reduction_factor": args.reduction_factor}
        for name, scheduler in (("grid", {"type": "fifo"}), ("asha", asha_scheduler)):
            started = time.perf_counter()
            spec = search_spec(name, scheduler, args.steps, args.grace, uri)
            result = orchestrator.tune(spec, echo=lambda line: None)
            wall = time.perf_counter() - started
            rows = result.leaderboard
            outcomes[name] = {
                "best": min(r["best_eval_loss"] for r in rows if r["best_eval_loss"] is not None),
                "trial_steps": sum(r["steps"] for r in rows),
                "trial_seconds": sum(r["wall_s"] for r in rows),
                "wall": wall,
                "stopped": sum(r["stopped_early"] for r in rows),
            }
    grid, asha = outcomes["grid"], outcomes["asha"]
    print(f"9 configurations (rank 4/8/16 × LoRA+ ratio 1/4/16), {args.steps} steps each at most, tiny Llama, "
          f"1 worker per trial; ASHA grace {args.grace}, reduction factor {args.reduction_factor}")
    for name, o in outcomes.items():
        print(f"{name:>5}: best eval_loss {o['best']:.4f} | trial-steps {o['trial_steps']} | stopped early {o['stopped']} | "
              f"search wall ÷ sum of trial times {o['wall'] / o['trial_seconds']:.2f}")
    print(f"ASHA ÷ grid: best eval_loss {asha['best'] / grid['best']:.4f} ({100 * (asha['best'] / grid['best'] - 1):+.2f}%), "
          f"trial-steps {asha['trial_steps'] / grid['trial_steps']:.3f}, search wall time {asha['wall'] / grid['wall']:.3f}")


if __name__ == "__main__":
    main()
