"""Bench suite `search`: the same 27 configurations (rank 4/8/16 × LoRA+ ratio 1/4/16 × three learning rates)
searched as a full grid and as each strategy, in one run on this machine.

Every strategy trains the built-in tiny Llama on the arithmetic data, one worker per trial. Two figures per
strategy, each against the full grid:
- trial-steps: optimizer steps the search's trials trained (the leaderboard's trained_steps: a trial that
  PBT restarts from another trial's checkpoint counts the steps it trains again);
- best: the best eval loss any of its trials reached, ÷ the grid's best.

The project's default strategy (synchronous successive halving with its default options over the seeded grid)
carries the goals:
trial-steps ≤ 0.33 and best ≤ 1.02. The others print beside it, without goals. PBT cannot change a rank
inside a run, so it runs one population per rank (9 trials each: ratio × learning rate, both perturbed).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from bench.perf import Bench, Figure

RANKS, RATIOS, RATES = [4, 8, 16], [1, 4, 16], [3e-4, 1e-3, 3e-3]
STEPS, EVAL_EVERY = 40, 5
DEFAULT = "sha"


def search_figures(bench: Bench) -> list[Figure]:
    import orchestrator
    from orchestrator.spec import validate_spec

    steps = STEPS if bench.steps >= 100 else 20  # --quick
    store = bench.root / "search-store"
    store.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ORCHESTRATOR_STORE_DIR", str(store))
    outcomes: dict[str, dict[str, Any]] = {}
    chosen = os.environ.get("BENCH_SEARCH_STRATEGIES")  # a comma-separated subset (the grid always runs)
    for name, searches in strategies(steps).items():
        if chosen and name != "grid" and name not in chosen.split(","):
            continue
        started, rows = time.perf_counter(), []
        for tag, tune, overrides in searches:
            spec = validate_spec(search_spec(f"{name}{tag}", tune, steps, f"file://{store}", overrides))
            rows += orchestrator.tune(spec, echo=lambda line: None).leaderboard
        outcomes[name] = {"best": min(r["best_eval_loss"] for r in rows if r["best_eval_loss"] is not None),
                          "trial_steps": sum(r["trained_steps"] for r in rows),
                          "trials": len(rows), "stopped": sum(r["stopped_early"] for r in rows),
                          "wall_s": time.perf_counter() - started}
        print(f"# search {name}: {outcomes[name]}", flush=True)
    grid = outcomes["grid"]
    figures = []
    for name, outcome in outcomes.items():
        if name == "grid":
            continue
        steps_ratio, best_ratio = outcome["trial_steps"] / grid["trial_steps"], outcome["best"] / grid["best"]
        detail = (f"{outcome['trials']} trials, {outcome['stopped']} stopped early, {outcome['trial_steps']} vs "
                  f"{grid['trial_steps']} trial-steps, best eval_loss {outcome['best']:.4f} vs {grid['best']:.4f}, "
                  f"wall {outcome['wall_s'] / grid['wall_s']:.2f}× the grid's")
        suffix = "" if name == DEFAULT else f"_{name}"
        goal_steps, goal_best = (0.33, 1.02) if name == DEFAULT else (float("inf"), float("inf"))
        figures.append(Figure(f"search_trial_steps{suffix}", steps_ratio, "<=", goal_steps, "ratio", detail))
        figures.append(Figure(f"search_best{suffix}", best_ratio, "<=", goal_best, "ratio", detail))
    return figures


def strategies(steps: int) -> dict[str, list[tuple[str, dict, dict]]]:
    """Each strategy as (name suffix, tune section, spec overrides) per search it runs."""
    space = {"adapter.r": {"choice": RANKS}, "optim.lora_plus_ratio": {"choice": RATIOS}, "optim.lr": {"choice": RATES}}
    # HyperBand and PBT pause trials and continue them from checkpoints: they need one at every reported result.
    every_eval = {"train": {"checkpoint_every": EVAL_EVERY}}
    rates_only = {k: v for k, v in space.items() if k != "adapter.r"}
    return {
        "grid": [("", {"search": "grid", "scheduler": {"type": "fifo"}, "space": space}, {})],
        "sha": [("", {"search": "grid", "space": space}, {})],  # the default scheduler with its default options
        "asha": [("", {"search": "grid", "space": space, "scheduler": {"type": "asha"}}, {})],
        "hyperband": [("", {"search": "grid", "space": space, "scheduler": {"type": "hyperband"}}, every_eval)],
        "optuna": [("", {"search": "optuna", "num_samples": 27, "space": space}, {})],
        "pbt": [(f"-r{rank}", {"search": "grid", "space": rates_only,
                               "scheduler": {"type": "pbt", "perturbation_interval": steps // 4}},
                 {**every_eval, "adapter": {"r": rank}}) for rank in RANKS],
    }


def search_spec(name: str, tune: dict, steps: int, storage_uri: str, overrides: dict) -> dict:
    spec = {
        "name": "bench-search",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"path": "builtin:arithmetic", "max_length": 32},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "train": {"max_steps": steps, "batch_size": 8, "eval_every": EVAL_EVERY, "eval_batches": 2,
                  "checkpoint_every": steps, "log_every": EVAL_EVERY, "keep_checkpoints": 2},
        "scaling": {"num_workers": 1},
        "storage": {"uri": storage_uri},
        "tune": {"name": name, "num_samples": 1, "seed": 0, **tune},
    }
    for section, values in overrides.items():
        spec[section] = {**spec[section], **values}
    return spec
