"""How a search picks its trials (`tune.search`): random sampling (grid dimensions expanded), a full grid of every
choice, or Optuna's TPE through Ray Tune's `OptunaSearch`.

Optuna's space is built define-by-run: the adapter method is drawn first, then only the dimensions that apply to
it (`adapter.r@vera`), so TPE models each method's own dimensions instead of values a trial ignores. A seed makes
every strategy reproducible and, for grids, decides the order the points run in: ASHA stops trials by comparing
them with those that ran before, so a grid written in another order must not change its cuts.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Optional

from orchestrator.adapters import DEFAULT_METHOD, get_method
from orchestrator.search.space import Dimension, TuneSpec, applies, split_key


def strategy_problems(tune: TuneSpec) -> list[str]:
    """Dimensions the chosen search cannot draw, one line each naming the dimension."""
    problems = []
    for key, dimension in tune.space.items():
        if tune.search == "optuna" and dimension.grid is not None:
            problems.append(f"tune.space.{key}: grid is for search random or grid; Optuna draws choice, uniform, "
                            "loguniform or randint")
        if tune.search == "grid" and dimension.kind not in ("choice", "grid"):
            problems.append(f"tune.space.{key}: search grid tries every value of choice or grid dimensions, "
                            f"not {dimension.kind}")
    return problems


def seeded_space(tune: TuneSpec, keys: dict[str, str]) -> dict[str, Any]:
    """Ray Tune's param_space for random and grid searches; each grid's values in an order drawn from the seed."""
    from ray import tune as ray_tune

    generator = random.Random(tune.seed)
    space = {}
    for name, key in keys.items():
        dimension = tune.space[key]
        values = dimension.grid_values(tune.search)
        if values is not None:
            shuffled = list(values)
            generator.shuffle(shuffled)
            space[name] = ray_tune.grid_search(shuffled)
        else:
            space[name] = dimension.to_tune()
    return space


def optuna_searcher(tune: TuneSpec, keys: dict[str, str], base_method: Optional[str], concurrency: int):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=define_by_run(tune, keys, base_method or DEFAULT_METHOD), metric=tune.metric,
                            mode=tune.mode, seed=tune.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)


def define_by_run(tune: TuneSpec, keys: dict[str, str], base_method: str) -> Callable[[Any], Optional[dict]]:
    """Optuna's trial → the trial's values: the method first, then the dimensions that apply to it."""
    return _DefineByRun(tune, keys, base_method)


class _DefineByRun:
    """A class, not a closure: Tune pickles the searcher with its state at every checkpoint of the search."""

    def __init__(self, tune: TuneSpec, keys: dict[str, str], base_method: str):
        self.tune, self.keys, self.base_method = tune, keys, base_method
        self.method_name = next((name for name, key in keys.items() if split_key(key)[0] == "adapter.method"), None)

    def __call__(self, trial) -> Optional[dict]:
        constants: dict[str, Any] = {}
        space, keys, method_name = self.tune.space, self.keys, self.method_name
        method = _suggest(trial, method_name, space[keys[method_name]], constants) if method_name else self.base_method
        fields = set(get_method(method).spec.model_fields)
        for name, key in keys.items():
            if name != method_name and applies(key, method, fields):
                _suggest(trial, name, space[key], constants)
        return constants or None


def _suggest(trial, name: str, dimension: Dimension, constants: dict[str, Any]) -> Any:
    if dimension.choice is not None:
        if all(value is None or isinstance(value, (bool, int, float, str)) for value in dimension.choice):
            return trial.suggest_categorical(name, dimension.choice)
        # Optuna's categories are plain scalars: a list (target_modules) is drawn by its JSON text and handed to
        # the trial as itself (OptunaSearch lets a define-by-run function override a drawn value).
        picked = json.loads(trial.suggest_categorical(name, [json.dumps(value) for value in dimension.choice]))
        constants[name] = picked
        return picked
    if dimension.uniform is not None:
        return trial.suggest_float(name, *dimension.uniform)
    if dimension.loguniform is not None:
        return trial.suggest_float(name, *dimension.loguniform, log=True)
    return trial.suggest_int(name, *dimension.randint)
