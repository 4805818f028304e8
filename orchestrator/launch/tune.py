"""`orchestrator tune`: a Ray Tune search whose trials are ordinary runs, stored under tune/<search>/.

Each trial is a Tune *function* trainable that builds one TorchTrainer (Train V2 does not accept a
trainer inside `tune.Tuner`) and hands its reports to Tune's scheduler (launch/trial.py). A trial that
a scheduler stops or pauses is killed inside `trainer.fit()`: everything a trial must leave behind
(checkpoints, adapter) is written by the worker loop itself, never after `fit()` returns.

tune/<search>/
  tuner/                 Tune's own state (what `--resume` restores)
  trials/<trial-id>/     one run each: spec.yaml, params.json, checkpoints/, adapter/, manifest.json …
  leaderboard.csv, leaderboard.md, curves.png, best/ (the best trial's adapter and best.json),
  manifest.json (written last)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import JobSpecError, OrchestratorError
from orchestrator.launch.preflight import preflight
from orchestrator.launch.runtime import TRIAL_SLOTS, ray_runtime, storage_for
from orchestrator.launch.trial import run_trial
from orchestrator.plan import build_plan
from orchestrator.results import tracking
from orchestrator.search import trial_count
from orchestrator.search.schedulers import PAUSING, build_scheduler
from orchestrator.search.strategy import optuna_searcher, seeded_space
from orchestrator.spec import JobSpec
from orchestrator.storage.fs import open_storage
from orchestrator.storage.objectstore import exported_env

# A trial's own driver needs almost nothing, but Tune refuses a trial that asks for nothing at all: without
# the trial slots (below) it asks for this.
_TRIAL_DRIVER_CPU = 0.01
# What a trial's driver and its Train controller hold in memory (measured: 0.77 GB with their queues and helpers).
# Declared, so that Ray starts no more trial drivers than a node can hold where there are no trial slots
# (a cluster the project did not start): 27 drivers waiting for workers took 18 GB on a 24 GB machine.
_TRIAL_DRIVER_MEMORY = 1 << 30


@dataclass
class TuneResult:
    search_uri: str
    leaderboard: list[dict[str, Any]]
    best: dict[str, Any]


def max_concurrent_trials(spec: JobSpec, cluster: dict[str, float]) -> int:
    """As many trials as the cluster holds at once (each: its workers plus a tiny driver share)."""
    per_trial_cpu = spec.scaling.num_workers * spec.scaling.cpus_per_worker + _TRIAL_DRIVER_CPU
    fits = math.floor(cluster.get("CPU", 0) / per_trial_cpu)
    per_trial_gpu = spec.scaling.num_workers * spec.scaling.gpus_per_worker
    if spec.scaling.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / per_trial_gpu))
    if cluster.get("memory", _TRIAL_DRIVER_MEMORY) < _TRIAL_DRIVER_MEMORY:
        raise OrchestratorError(f"scaling: a trial's driver needs {_TRIAL_DRIVER_MEMORY / 2**30:g} GiB of Ray's memory "
                                f"resource but the Ray cluster has {cluster['memory'] / 2**30:.2f} GiB")
    if fits < 1:
        raise OrchestratorError(
            f"scaling: one trial needs {per_trial_cpu:g} CPUs"
            + (f" and {per_trial_gpu:g} GPUs" if spec.scaling.use_gpu else "")
            + f" but the Ray cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs"
        )
    wanted = spec.tune.max_concurrent_trials or fits
    return max(1, min(wanted, fits, trial_count(spec.tune)))


def trial_driver_resources(spec: JobSpec, concurrency: int, cluster: dict[str, float]) -> dict[str, float]:
    """What each trial's driver asks Ray for: with the trial slots of a Ray this project started, a share that
    lets `concurrency` drivers live at once. The pausing schedulers (sha, HyperBand, PBT) create every trial at
    once; without the slots each trial's driver and Train controller started and waited for workers (measured:
    15 idle trials held the load average of 2 cores at 22-32, and 14 of 27 trials trained 5 steps in 20 minutes)."""
    slots = cluster.get(TRIAL_SLOTS, 0)
    if slots <= 0:
        if spec.tune.scheduler.type in PAUSING and spec.tune.max_concurrent_trials is not None:
            # Elsewhere the searcher caps the trials alive; these schedulers need every trial alive to compare them.
            raise OrchestratorError(f"tune.max_concurrent_trials: {spec.tune.scheduler.type} creates every trial at once and "
                                    f"this Ray cluster has no {TRIAL_SLOTS} resource to cap how many run (cluster/ "
                                    f"declares it on the head); leave it out, or use scheduler asha")
        return {"CPU": _TRIAL_DRIVER_CPU, "memory": _TRIAL_DRIVER_MEMORY}
    # No CPU: the drivers go where the slots are, a cluster's head too, which keeps its CPUs at 0 (cluster/).
    return {"CPU": 0, "memory": _TRIAL_DRIVER_MEMORY, TRIAL_SLOTS: math.floor(slots / concurrency * 1e4) / 1e4}


def tune(spec: JobSpec, *, local: bool = True, resume: bool = False, echo=print) -> TuneResult:
    """Run (or resume) the spec's search; returns the leaderboard, best first."""
    from orchestrator.results.leaderboard import publish

    if spec.tune is None:
        raise JobSpecError("tune: this job has no tune section (a search space, num_samples, scheduler)")
    if spec.scaling.min_workers is not None and spec.scaling.min_workers < spec.scaling.num_workers:
        # Trials are compared at equal steps and equal worker counts; Tune's schedulers own their resources.
        raise JobSpecError("scaling.min_workers: elastic training is for orchestrator run; a search's trials use num_workers")
    tracker = tracking.connect(spec)  # a missing MLflow or an unreachable server fails before anything runs
    resolved = preflight(spec)
    for note in resolved.notes:  # rows data.bad_rows: skip leaves out
        echo(note)
    build_plan(spec)  # as run does: refuse a DeepSpeed config that would change the algorithm, before Ray starts
    search = spec.tune.name or spec.name
    with storage_for(spec, local, echo) as storage_uri:
        storage = open_storage(storage_uri, spec.storage.endpoint_url)
        storage.check_writable()
        search_dir = storage.path("tune", search)
        with ray_runtime(spec, local, idle_driver_slots=1, trim_train_helpers=True):
            results = _fit_search(spec, search, storage, search_dir, storage_uri, resolved, resume, echo, tracker)
            leaderboard, best = publish(spec, search, storage, search_dir, results, echo)
    return TuneResult(f"{storage.uri}/tune/{search}", leaderboard, best)


def _fit_search(spec, search, storage, search_dir, storage_uri, resolved, resume, echo, tracker=None):
    import ray
    from ray import tune as ray_tune
    from ray.tune.search import BasicVariantGenerator

    from orchestrator.launch.tune_progress import SearchProgress, set_sink

    set_sink(echo)

    keys = {f"p{i}": key for i, key in enumerate(spec.tune.space)}  # Tune-safe names for dotted keys
    context = {"keys": keys, "base": spec.model_dump(mode="json", exclude={"tune"}), "search": search,
               "storage_uri": storage_uri, "resolved": resolved, "tune": spec.tune}
    cluster = ray.cluster_resources()
    concurrency = max_concurrent_trials(spec, cluster)
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, context=context),
                                        trial_driver_resources(spec, concurrency, cluster))
    fs = storage.pyarrow_filesystem()
    tuner_path = f"{search_dir}/tuner"
    if resume:
        if not ray_tune.Tuner.can_restore(tuner_path, storage_filesystem=fs):
            raise OrchestratorError(f"--resume: no search {search!r} to resume in {storage.uri}")
        echo(f"resuming search {storage.uri}/tune/{search} (finished trials are kept)")
        tuner = ray_tune.Tuner.restore(tuner_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        if storage.exists(f"{search_dir}/manifest.json") or ray_tune.Tuner.can_restore(tuner_path, storage_filesystem=fs):
            raise OrchestratorError(f"tune.name: search {search!r} already exists in {storage.uri}; use --resume or another tune.name")
        options = spec.tune.scheduler
        scheduler = build_scheduler(spec, keys)
        echo(f"search {search}: {trial_count(spec.tune)} trials ({spec.tune.search}), up to {concurrency} at once, "
             f"{options.type} on {spec.tune.metric}")
        if spec.tune.search == "optuna":
            param_space, search_alg = {}, optuna_searcher(spec.tune, keys, spec.adapter.method, concurrency)
        else:
            param_space = seeded_space(spec.tune, keys)
            # sha, HyperBand and PBT compare a bracket's (a population's) trials while they live, pausing them in
            # turn: every trial is created at once, and the trial slots (or the cluster's resources) decide how many run.
            pausing = options.type in PAUSING
            search_alg = BasicVariantGenerator(max_concurrent=0 if pausing else concurrency, random_state=spec.tune.seed)
        tuner = ray_tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray_tune.TuneConfig(
                metric=spec.tune.metric, mode=spec.tune.mode, scheduler=scheduler, num_samples=spec.tune.num_samples,
                search_alg=search_alg,
            ),
            run_config=ray_tune.RunConfig(
                name="tuner", storage_path=search_dir, storage_filesystem=fs, verbose=0,
                callbacks=[SearchProgress(keys, spec.tune.metric, spec.tune.mode, spec.train.max_steps),
                           *tracking.tune_callbacks(tracker, keys, f"{storage.uri}/tune/{search}")],
            ),
        )
    # Tune would log each failed trial's whole traceback here; SearchProgress prints its cause in one line,
    # and the traceback stays in the trial's error.txt.
    with exported_env({"TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}), warnings.catch_warnings():
        # Tune suggests reusing actors under PBT; a trial's actor only waits on its worker group, which cannot be reused.
        warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
        results = tuner.fit()
    return results, keys
