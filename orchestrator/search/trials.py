"""From a search to its trials: the raw spec of one sampled point, and the check that every point the
space can produce gives a valid spec.

Knows the spec only through the instance it is given (no import of orchestrator.spec, which
validates its `tune` section with `check_search`)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Callable, Optional

from orchestrator.adapters import DEFAULT_METHOD, all_methods, get_method
from orchestrator.search.space import SEARCHABLE_SECTIONS, applies, split_key

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec


def trial_raw(base: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """The raw spec of one trial: `base` (a JobSpec dump) with the sampled values that apply to it."""
    raw = {section: (dict(value) if isinstance(value, dict) else value) for section, value in base.items() if section != "tune"}
    method = get_method(sampled.get("adapter.method", raw["adapter"].get("method", DEFAULT_METHOD)))
    fields = set(method.spec.model_fields)
    if method.name != raw["adapter"].get("method", DEFAULT_METHOD):
        # Another method: keep the options it shares with the base (r, target_modules, …).
        raw["adapter"] = {k: v for k, v in raw["adapter"].items() if k in fields} | {"method": method.name}
    for key, value in sampled.items():
        path, _ = split_key(key)
        if path != "adapter.method" and applies(key, method.name, fields):
            section, field = path.split(".", 1)
            raw.setdefault(section, {})[field] = value
    if not method.trains_a_and_b:
        raw.setdefault("optim", {})["lora_plus_ratio"] = None
    return raw


def check_search(spec: JobSpec, trial_problem: Callable[[dict[str, Any]], Optional[str]]) -> None:
    """Every dimension names a searchable field, applies to some searched method, and each of its
    extreme values gives a valid trial spec (`trial_problem(raw)` is None). Raises ValueError naming
    `tune.space.<key>`."""
    from orchestrator.search.schedulers import scheduler_problems
    from orchestrator.search.strategy import strategy_problems

    problems = strategy_problems(spec.tune)
    if problems:
        raise ValueError("; ".join(problems))
    space = spec.tune.space
    train = spec.train
    if train.eval_every == 0 or (train.checkpoint_every and train.checkpoint_every % train.eval_every):
        raise ValueError("train.eval_every: a search needs evaluations, and checkpoint_every must be a multiple of "
                         "eval_every, so that every result Tune sees carries eval_loss")
    problems = scheduler_problems(spec)
    if problems:
        raise ValueError("; ".join(problems))
    base = spec.model_dump(mode="json", exclude={"tune"})
    searched = _searched_methods(spec)
    for key, dimension in space.items():
        path, methods = split_key(key)
        where = f"tune.space.{key}"
        _check_field(spec, where, path, methods, searched)
        candidates = methods or searched
        section = path.partition(".")[0]
        for value in dimension.extremes():
            for method in (candidates if section == "adapter" or methods else searched[:1]):
                sampled = {"adapter.method": method, key: value} if path != "adapter.method" else {key: value}
                problem = trial_problem(trial_raw(base, sampled))
                if problem is not None:
                    raise ValueError(f"{where}: value {value!r} gives an invalid trial: {problem}")


def _searched_methods(spec: JobSpec) -> list[str]:
    """The adapter methods the search can pick: the `adapter.method` dimension's values, or the spec's."""
    known = {m.name for m in all_methods()}
    method_dim = next((d for k, d in spec.tune.space.items() if split_key(k)[0] == "adapter.method"), None)
    searched = method_dim.extremes() if method_dim is not None else [spec.adapter.method]
    unknown = [m for m in searched if m not in known]
    if unknown:
        raise ValueError(f"tune.space.adapter.method: unknown adapter method {unknown[0]!r}; known methods: {', '.join(sorted(known))}")
    return searched


def _check_field(spec: JobSpec, where: str, path: str, methods: Optional[list[str]], searched: list[str]) -> None:
    """The dimension's path names a field of a searchable section (of every method it is limited to)."""
    section, _, field = path.partition(".")
    if section not in SEARCHABLE_SECTIONS or not field or "." in field:
        raise ValueError(f"{where}: only fields of {', '.join(SEARCHABLE_SECTIONS)} can be searched (e.g. adapter.r, optim.lr)")
    if methods is not None:
        strangers = [m for m in methods if m not in searched]
        if strangers:
            raise ValueError(f"{where}: method {strangers[0]!r} is not searched (searched: {', '.join(searched)})")
    candidates = methods or searched
    if section == "adapter":
        lacking = [m for m in candidates if field != "method" and field not in get_method(m).spec.model_fields]
        if len(lacking) == len(candidates) or (methods and lacking):
            options = sorted(get_method(lacking[0]).spec.model_fields)
            guess = difflib.get_close_matches(field, options, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; its fields: {', '.join(options)}"
            raise ValueError(f"{where}: adapter method {lacking[0]!r} has no field {field!r}{hint}")
    else:
        options = list(type(spec).model_fields[section].annotation.model_fields)
        if field not in options:
            guess = difflib.get_close_matches(field, options, n=1)
            raise ValueError(f"{where}: unknown field{f'; did you mean {guess[0]!r}?' if guess else ''}")
