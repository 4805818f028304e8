"""How a search spends its steps (`tune.scheduler`): ASHA, synchronous successive halving, synchronous HyperBand,
PBT or FIFO, as Ray Tune's schedulers over the optimizer step.

SHA, HyperBand and PBT stop a trial's actor and start it again later (PBT: with another trial's checkpoint and
perturbed rates). A trial is an ordinary run, so it goes on from a checkpoint in its own storage; these
schedulers therefore see a trial's results only at its checkpoints (launch/trial.py), so that every point where
they pause a trial is one it can continue from without repeating steps. SHA's trials checkpoint at its rungs
themselves; HyperBand and PBT use the spec's checkpoint_every.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Optional

from orchestrator.search.space import MUTABLE_MID_RUN, Dimension, TuneSpec, split_key, trial_count

if TYPE_CHECKING:
    from orchestrator.search.space import SchedulerSpec
    from orchestrator.spec import JobSpec, TrainSpec

# Schedulers that pause trials and continue them from a checkpoint.
PAUSING = ("sha", "hyperband", "pbt")


def scheduler_problems(spec: JobSpec) -> list[str]:
    """What the chosen scheduler cannot do with this job, one line each naming the field."""
    tune, train, problems = spec.tune, spec.train, []
    kind = tune.scheduler.type
    if kind in ("hyperband", "pbt") and not train.checkpoint_every:
        problems.append(f"train.checkpoint_every: {kind} pauses trials and continues them from their checkpoints; "
                        "set checkpoint_every (a multiple of eval_every)")
    if kind == "sha" and tune.search == "optuna":
        problems.append("tune.search: optuna draws each trial after seeing the last ones' results; sha compares every "
                        "trial at each rung, so all are drawn at once (use random or grid, or scheduler asha)")
    if kind != "pbt":
        return problems
    for key in tune.space:
        path, _ = split_key(key)
        if path not in MUTABLE_MID_RUN:
            problems.append(f"tune.space.{key}: pbt changes a trial's values mid-run and {path} cannot change inside a "
                            f"run; pbt perturbs {' and '.join(MUTABLE_MID_RUN)} (search the rest in separate searches)")
    if tune.search == "optuna":
        problems.append("tune.search: optuna draws each trial's values once; pbt perturbs them mid-run (use random or grid)")
    interval = tune.scheduler.perturbation_interval
    if interval is not None and train.checkpoint_every and interval % train.checkpoint_every:
        problems.append(f"tune.scheduler.perturbation_interval: {interval} is not a multiple of train.checkpoint_every "
                        f"({train.checkpoint_every}); a trial can only be copied at its checkpoints")
    if trial_count(tune) < 2:
        problems.append("tune.num_samples: pbt needs a population of at least 2 trials")
    return problems


def build_scheduler(spec: JobSpec, keys: dict[str, str]):
    """The Ray Tune scheduler for the spec's `tune.scheduler`; `keys` maps Tune's parameter names to dotted keys."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    options, max_steps = spec.tune.scheduler, spec.train.max_steps
    if options.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=grace_period(options, spec.train),
                             reduction_factor=reduction_factor(options))
    if options.type == "sha":
        from orchestrator.search.halving import SuccessiveHalving

        return SuccessiveHalving(trials=trial_count(spec.tune), grace_period=grace_period(options, spec.train),
                                 reduction_factor=reduction_factor(options), max_t=max_steps, time_attr="step")
    if options.type == "hyperband":
        return HyperBandScheduler(time_attr="step", max_t=max_steps, reduction_factor=reduction_factor(options))
    if options.type == "pbt":
        # Ray's PBT draws from the module-level generator: seeding it makes a search's perturbations reproducible.
        random.seed(spec.tune.seed)
        mutations = {name: _mutation_domain(spec.tune.space[key]) for name, key in keys.items()}
        from orchestrator.search.pbt import PopulationBasedTrainingWithinRuns

        return PopulationBasedTrainingWithinRuns(
            max_t=max_steps, time_attr="step", perturbation_interval=options.perturbation_interval or spec.train.checkpoint_every,
            hyperparam_mutations=mutations, quantile_fraction=options.quantile_fraction or 0.25,
            resample_probability=0.25 if options.resample_probability is None else options.resample_probability,
            custom_explore_fn=_InsideBounds({name: spec.tune.space[key] for name, key in keys.items()}),
        )
    return FIFOScheduler()


# asha keeps Ray's halving by 2 (measured best of 2-4 on the search bench); the synchronous ones use Hyperband's η.
_DEFAULT_REDUCTION = {"asha": 2.0, "sha": 3.0, "hyperband": 3.0}


def reduction_factor(options: SchedulerSpec) -> float:
    return options.reduction_factor or _DEFAULT_REDUCTION[options.type]


def grace_period(options: SchedulerSpec, train: TrainSpec) -> int:
    return options.grace_period or train.eval_every or train.max_steps


def scheduler_rungs(tune: Optional[TuneSpec], train: TrainSpec) -> tuple[int, ...]:
    """The steps where the search's scheduler decides, where its trials evaluate and checkpoint (sha's rungs)."""
    if tune is None or tune.scheduler.type != "sha":
        return ()
    from orchestrator.search.halving import halving_rungs

    return halving_rungs(grace_period(tune.scheduler, train), reduction_factor(tune.scheduler), train.max_steps)


def _mutation_domain(dimension: Dimension):
    """A listed dimension is perturbed to a neighbouring value; a continuous one is multiplied by 0.8 or 1.2."""
    listed = dimension.choice if dimension.choice is not None else dimension.grid
    return list(listed) if listed is not None else dimension.to_tune()


class _InsideBounds:
    """PBT multiplies a continuous value by 0.8 or 1.2; the result is kept inside the dimension's bounds, so a
    perturbed trial is one the search was checked for (a class: Tune pickles its scheduler)."""

    def __init__(self, dimensions: dict[str, Dimension]):
        self.bounds = {name: d.uniform or d.loguniform or d.randint for name, d in dimensions.items()}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for name, bounds in self.bounds.items():
            if bounds is not None and name in config:
                config[name] = type(bounds[0])(min(max(config[name], bounds[0]), bounds[1]))
        return config


def perturbed_fields(tune: Optional[TuneSpec]) -> tuple[str, ...]:
    """The spec fields a trial of this search may change between its own checkpoints."""
    return MUTABLE_MID_RUN if tune is not None and tune.scheduler.type == "pbt" else ()
