"""The `tune:` section of a job: a search space over spec fields by dotted path, and how trials run.

A dimension key is a dotted spec path, optionally limited to some adapter methods with `@`:
    adapter.r@lora,lora_fa: {choice: [8, 16, 32]}
    adapter.r@vera:         {choice: [256, 512]}
    optim.lr:               {loguniform: [1.0e-4, 1.0e-2]}
    adapter.method:         {choice: [lora, lora_fa, vera]}
A dimension applies to a trial only if the trial's method has that field (and is listed after `@`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The sections a search may vary; the model, data, storage and workers define the job itself.
SEARCHABLE_SECTIONS = ("adapter", "optim", "train", "deepspeed")


class Dimension(BaseModel):
    model_config = ConfigDict(extra="forbid")

    choice: Optional[list[Any]] = Field(None, description="Pick one of these values.")
    grid: Optional[list[Any]] = Field(None, description="Try every value (the whole grid is run num_samples times).")
    uniform: Optional[tuple[float, float]] = Field(None, description="[low, high], uniform.")
    loguniform: Optional[tuple[float, float]] = Field(None, description="[low, high], uniform in log space (low > 0).")
    randint: Optional[tuple[int, int]] = Field(None, description="[low, high], integers, both ends included.")

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        kinds = [name for name in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform, randint")
        for kind in ("choice", "grid"):
            if getattr(self, kind) is not None and not getattr(self, kind):
                raise ValueError(f"{kind} must not be empty")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None:
            low, high = bounds
            if not low < high and not (self.randint and low == high):
                raise ValueError(f"bounds must be [low, high] with low < high (got [{low}, {high}])")
            if self.loguniform and low <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {low})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, name) is not None)

    def grid_values(self, search: str) -> Optional[list[Any]]:
        """The values tried one by one: a grid's, and with search grid a choice's too; None for sampled ones."""
        return self.grid if self.grid is not None else (self.choice if search == "grid" else None)

    def extremes(self) -> list[Any]:
        """Values that bound what the dimension can produce: every choice, or both ends."""
        return list(getattr(self, self.kind))

    def to_tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(self.randint[0], self.randint[1] + 1)


# Fields a trial may change between two of its own checkpoints: PBT perturbs only these (the optimizer's moments
# stay meaningful under a new rate; a new rank or method would not fit the checkpoint at all).
MUTABLE_MID_RUN = ("optim.lr", "optim.lora_plus_ratio")

# The options each scheduler takes; any other given option is refused, naming the scheduler.
SCHEDULER_OPTIONS = {
    "asha": ("grace_period", "reduction_factor"),
    "sha": ("grace_period", "reduction_factor"),
    "hyperband": ("reduction_factor",),
    "pbt": ("perturbation_interval", "quantile_fraction", "resample_probability"),
    "fifo": (),
}
_WHAT_IT_DOES = {"fifo": "fifo runs every trial to the end", "asha": "asha stops poor trials at its rungs",
                 "sha": "sha pauses every trial at each rung and continues the best",
                 "hyperband": "hyperband pauses and continues trials in synchronous brackets",
                 "pbt": "pbt copies good trials over poor ones and perturbs their rates"}


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["asha", "sha", "hyperband", "pbt", "fifo"] = Field("sha", description=(
        "Default: sha for random and grid searches, asha for optuna or with max_concurrent_trials. "
        "asha stops poor trials early (asynchronous successive halving); sha (synchronous successive halving) "
        "pauses every trial at each rung and continues the best 1/reduction_factor from their checkpoints; "
        "hyperband runs synchronous brackets, "
        "pausing trials at each rung and continuing the best from their checkpoints; pbt (population-based "
        "training) continues poor trials from good ones' checkpoints with perturbed optim.lr / lora_plus_ratio; "
        "fifo runs all to the end."))
    grace_period: Optional[int] = Field(None, ge=1, description="asha, sha: steps before a trial may be stopped, the first rung (default: train.eval_every).")
    reduction_factor: Optional[float] = Field(None, gt=1, description="asha (default 2), sha and hyperband (default 3): 1/reduction_factor of the trials go on at each rung.")
    perturbation_interval: Optional[int] = Field(None, ge=1, description="pbt: steps between perturbations, a multiple of train.checkpoint_every (default: train.checkpoint_every).")
    quantile_fraction: Optional[float] = Field(None, gt=0, le=0.5, description="pbt: the bottom fraction that copies the top fraction (default 0.25).")
    resample_probability: Optional[float] = Field(None, ge=0, le=1, description="pbt: chance a perturbed value is drawn anew from its dimension instead (default 0.25).")

    @model_validator(mode="after")
    def _options_fit_the_scheduler(self) -> "SchedulerSpec":
        allowed = SCHEDULER_OPTIONS[self.type]
        for options in SCHEDULER_OPTIONS.values():
            for name in options:
                if name not in allowed and getattr(self, name) is not None:
                    owners = [kind for kind, names in SCHEDULER_OPTIONS.items() if name in names]
                    raise ValueError(f"{name} is an option of {' and '.join(owners)}; {_WHAT_IT_DOES[self.type]}")
        return self


class TuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="Search name (default: the job name); stored under tune/<name>/.")
    space: dict[str, Dimension] = Field(min_length=1, description="Dotted spec path (optionally @method,…) → dimension.")
    num_samples: int = Field(4, ge=1, description="Trials to run (with grid dimensions: repeats of the whole grid).")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="Default and upper bound: what the cluster holds at once.")
    metric: Literal["eval_loss", "loss"] = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search: Literal["random", "grid", "optuna"] = Field("random", description=(
        "random: sample choice/uniform/… dimensions, expand grid ones; grid: every combination of choice and grid "
        "values; optuna: Optuna's TPE (define-by-run: the method first, then the dimensions that apply to it)."))
    seed: int = Field(0, description="Seed of the sampler, so a search is reproducible; also the order grid points run in.")

    @model_validator(mode="after")
    def _default_scheduler_for_the_search(self) -> "TuneSpec":
        # sha compares every trial at each rung, so all are created up front. Optuna draws each trial from the
        # results of those before it, and max_concurrent_trials must hold on clusters without the trial slots
        # (launch/tune.py): both leave the default to asha, whose cuts are asynchronous.
        if "type" not in self.scheduler.model_fields_set and (self.search == "optuna" or self.max_concurrent_trials):
            self.scheduler = self.scheduler.model_copy(update={"type": "asha"})
        return self


def trial_count(tune_spec: TuneSpec) -> int:
    """num_samples, times the size of every grid dimension (with search grid, of every choice dimension too)."""
    count = tune_spec.num_samples
    for dimension in tune_spec.space.values():
        values = dimension.grid_values(tune_spec.search)
        count *= len(values) if values is not None else 1
    return count


def split_key(key: str) -> tuple[str, Optional[list[str]]]:
    """`adapter.r@lora,vera` → ("adapter.r", ["lora", "vera"])."""
    path, _, methods = key.partition("@")
    return path, ([m.strip() for m in methods.split(",") if m.strip()] if methods else None)


def applies(key: str, method_name: str, method_fields: set[str]) -> bool:
    """Whether dimension `key` applies to a trial whose adapter method is `method_name`."""
    path, methods = split_key(key)
    if methods is not None and method_name not in methods:
        return False
    section, _, field = path.partition(".")
    return section != "adapter" or field == "method" or field in method_fields
