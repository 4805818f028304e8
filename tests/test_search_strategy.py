"""How a search picks trials (orchestrator/search/strategy.py), without Ray: Optuna's define-by-run space draws only
the dimensions that apply to the drawn method, grids run in a seeded order, and options that do not fit the
search or the scheduler are refused naming the field. The Ray search itself is in tests/test_tune.py."""

from __future__ import annotations

import pytest

from orchestrator.errors import JobSpecError
from orchestrator.search.strategy import define_by_run, seeded_space
from orchestrator.spec import validate_spec
from tests.helpers import MINIMAL_SPEC, make_spec

SPACE = {
    "adapter.method": {"choice": ["lora", "vera"]},
    "adapter.r@lora": {"choice": [4, 8]},
    "adapter.r@vera": {"choice": [64, 128]},
    "adapter.d_initial@vera": {"uniform": [0.05, 0.2]},
    "adapter.target_modules@lora": {"choice": [["q_proj", "v_proj"], ["q_proj"]]},
    "optim.lr": {"loguniform": [1e-4, 1e-2]},
}


def search(space: dict, **tune):
    return make_spec(base=MINIMAL_SPEC, name="s", train={"max_steps": 20, "eval_every": 5, "checkpoint_every": 10},
                     tune={"space": space, **tune})


def test_optuna_draws_the_method_first_then_only_its_dimensions():
    import optuna

    spec = search(SPACE, search="optuna", seed=3)
    keys = {f"p{i}": key for i, key in enumerate(spec.tune.space)}
    define = define_by_run(spec.tune, keys, "lora")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = define(trial) or {}
        drawn = {keys[name] for name in trial.params}
        method = trial.params["p0"]
        seen.add(method)
        expected = {"adapter.method", "optim.lr"} | ({"adapter.r@lora", "adapter.target_modules@lora"} if method == "lora"
                                                      else {"adapter.r@vera", "adapter.d_initial@vera"})
        assert drawn == expected, (method, drawn)
        if method == "lora":  # a list-valued choice reaches the trial as the list itself
            assert constants["p4"] in (["q_proj", "v_proj"], ["q_proj"])
        study.tell(trial, trial.params["p5"])
    assert seen == {"lora", "vera"}


def test_grids_run_in_an_order_drawn_from_the_seed():
    space = {"adapter.r": {"grid": [2, 4, 8, 16, 32]}, "optim.lr": {"choice": [1e-3, 1e-4]}}
    keys = {"p0": "adapter.r", "p1": "optim.lr"}
    orders = {seed: seeded_space(search(space, seed=seed).tune, keys)["p0"]["grid_search"] for seed in range(6)}
    assert all(sorted(order) == [2, 4, 8, 16, 32] for order in orders.values())
    assert orders[0] == seeded_space(search(space, seed=0).tune, keys)["p0"]["grid_search"]  # reproducible
    assert len({tuple(order) for order in orders.values()}) > 1
    # search grid: every choice is a grid too
    grid = seeded_space(search(space, search="grid").tune, keys)
    assert sorted(grid["p1"]["grid_search"]) == [1e-4, 1e-3]
    from orchestrator.search import trial_count

    assert trial_count(search(space, search="grid", num_samples=1).tune) == 10


@pytest.mark.parametrize("space, tune, message", [
    ({"adapter.r": {"grid": [4, 8]}}, {"search": "optuna"}, "tune.space.adapter.r: grid is for search random or grid"),
    ({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, {"search": "grid"},
     "tune.space.optim.lr: search grid tries every value of choice or grid dimensions, not loguniform"),
    ({"optim.lr": {"choice": [1e-3]}}, {"search": "bayes"}, "tune.search: Input should be 'random', 'grid' or 'optuna'"),
    ({"optim.lr": {"choice": [1e-3]}}, {"scheduler": {"type": "fifo", "grace_period": 5}},
     "tune.scheduler: grace_period is an option of asha and sha; fifo runs every trial to the end"),
    ({"optim.lr": {"choice": [1e-3]}}, {"scheduler": {"type": "median"}},
     "tune.scheduler.type: Input should be 'asha', 'sha', 'hyperband', 'pbt' or 'fifo'"),
    ({"optim.lr": {"choice": [1e-3]}}, {"scheduler": {"type": "hyperband", "grace_period": 5}},
     "tune.scheduler: grace_period is an option of asha and sha; hyperband pauses"),
    # sha compares all trials at each rung: Optuna, which draws each trial from the last ones' results, cannot feed it
    ({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, {"scheduler": {"type": "sha"}, "search": "optuna"},
     "tune.search: optuna draws each trial after seeing the last ones' results; sha compares every trial"),
    ({"optim.lr": {"choice": [1e-3]}}, {"scheduler": {"type": "asha", "perturbation_interval": 10}},
     "tune.scheduler: perturbation_interval is an option of pbt; asha stops"),
    ({"optim.lr": {"choice": [1e-3]}}, {"scheduler": {"type": "pbt", "quantile_fraction": 0.7}},
     "tune.scheduler.quantile_fraction: Input should be less than or equal to 0.5"),
    # PBT copies one trial's checkpoint into another: only what may change inside a run can differ between them
    ({"adapter.r": {"choice": [4, 8]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}}, {"scheduler": {"type": "pbt"}, "num_samples": 4},
     "tune.space.adapter.r: pbt changes a trial's values mid-run and adapter.r cannot change inside a run"),
    ({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, {"scheduler": {"type": "pbt"}, "search": "optuna", "num_samples": 4},
     "tune.search: optuna draws each trial's values once; pbt perturbs them"),
    ({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, {"scheduler": {"type": "pbt", "perturbation_interval": 15}, "num_samples": 4},
     "tune.scheduler.perturbation_interval: 15 is not a multiple of train.checkpoint_every (10)"),
    ({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, {"scheduler": {"type": "pbt"}, "num_samples": 1},
     "tune.num_samples: pbt needs a population of at least 2 trials"),
])
def test_options_that_do_not_fit_the_search_are_refused_naming_the_field(space, tune, message):
    raw = make_spec(base=MINIMAL_SPEC, raw=True, name="s", train={"max_steps": 20, "eval_every": 5, "checkpoint_every": 10},
                    tune={"space": space, **tune})
    with pytest.raises(JobSpecError) as error:
        validate_spec(raw, source="search.yaml")
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("kind", ["hyperband", "pbt"])
def test_pausing_schedulers_need_checkpoints_to_continue_from(kind):
    raw = make_spec(base=MINIMAL_SPEC, raw=True, name="s", train={"max_steps": 20, "eval_every": 5, "checkpoint_every": 0},
                    tune={"space": {"optim.lr": {"choice": [1e-3, 1e-4]}}, "num_samples": 2, "scheduler": {"type": kind}})
    with pytest.raises(JobSpecError, match=f"train.checkpoint_every: {kind} pauses trials and continues them"):
        validate_spec(raw, source="search.yaml")


def test_pbt_perturbs_only_the_rates_and_keeps_them_inside_their_bounds():
    import random

    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pbt import _explore

    from orchestrator.search.schedulers import build_scheduler

    spec = search({"optim.lr": {"loguniform": [1e-4, 1e-3]}, "optim.lora_plus_ratio": {"choice": [1, 4, 16]}},
                  scheduler={"type": "pbt", "perturbation_interval": 10}, num_samples=4)
    scheduler = build_scheduler(spec, {"p0": "optim.lr", "p1": "optim.lora_plus_ratio"})
    assert isinstance(scheduler, PopulationBasedTraining) and scheduler._perturbation_interval == 10
    random.seed(0)
    seen = set()
    for _ in range(60):  # 1e-3 × 1.2 would leave the dimension: it is held at its upper bound
        config, _ = _explore({"p0": 1e-3, "p1": 4}, scheduler._hyperparam_mutations, 0.25, (1.2, 0.8),
                             scheduler._custom_explore_fn)
        assert 1e-4 <= config["p0"] <= 1e-3 and config["p1"] in (1, 4, 16)
        seen.add(config["p1"])
    assert seen == {1, 4, 16}


@pytest.mark.parametrize("tune, scheduler", [
    ({}, "sha"),                                            # random: every trial drawn up front
    ({"search": "grid"}, "sha"),
    ({"search": "optuna"}, "asha"),                         # draws each trial after seeing the last ones
    ({"max_concurrent_trials": 2}, "asha"),                 # a cap that must hold on any cluster
    ({"search": "grid", "scheduler": {"type": "fifo"}}, "fifo"),  # an explicit choice wins
    ({"max_concurrent_trials": 2, "scheduler": {"type": "sha"}}, "sha"),
])
def test_the_default_scheduler_fits_the_search(tune, scheduler):
    assert search({"optim.lr": {"choice": [1e-3, 3e-3]}}, **tune).tune.scheduler.type == scheduler
