"""`orchestrator run`: spec → preflight → run identity in storage → Ray Train (TorchTrainer) → result."""

from __future__ import annotations

import copy
import functools
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from orchestrator.errors import JobSpecError, OrchestratorError
from orchestrator.launch.preflight import preflight
from orchestrator.launch.progress import ProgressPrinter
from orchestrator.launch.runtime import require_resources, storage_and_ray, with_local_cpu_share
from orchestrator.batching import global_batch, split_global_batch, uneven_counts_message, uneven_worker_counts
from orchestrator.plan import build_plan
from orchestrator.results import tracking
from orchestrator.spec import JobSpec, spec_to_yaml
from orchestrator.storage.fs import open_storage
from orchestrator.storage.layout import RunLayout, job_run_ids, new_run_id
from orchestrator.storage.manifest import read_manifest

# Changing these between two starts of one run would make its checkpoints meaningless. The worker count may
# change (the global batch is kept: _keep_global_batch), and so may the ZeRO stage (the training state is whole).
_RUN_IDENTITY = ("model", "data", "adapter", "optim", "deepspeed.config", "train.seed")


class TrainingFailed(OrchestratorError):
    """Training started but a worker failed; the last complete checkpoint stays in storage."""

    exit_code = 1


@dataclass
class RunResult:
    run_uri: str
    adapter_uri: str
    summary: dict[str, Any]
    events: list[dict] = field(default_factory=list)


def _lookup(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data


def check_same_run(stored: dict, spec: JobSpec, run_id: str, may_change: tuple[str, ...] = ()) -> None:
    """Refuse, naming the field, a spec that would continue run `run_id`'s checkpoints with another model, data,
    adapter or optimizer; `may_change` lists dotted fields that may differ (a PBT trial's perturbed rates)."""
    current = spec.model_dump(mode="json")
    try:  # a spec stored by an older version lacks fields added since: compare with their defaults filled in
        stored = JobSpec.model_validate(stored).model_dump(mode="json")
    except ValueError:
        stored = copy.deepcopy(stored)
    for dotted in may_change:
        for tree in (stored, current):
            parent, _, name = dotted.rpartition(".")
            branch = _lookup(tree, parent) if parent else tree
            if isinstance(branch, dict):
                branch.pop(name, None)
    for key in _RUN_IDENTITY:
        if _lookup(stored, key) != _lookup(current, key):
            raise JobSpecError(
                f"{key}: differs from the spec stored with run {run_id} "
                f"({_lookup(stored, key)!r} there, {_lookup(current, key)!r} now); start a new run instead"
            )


def _keep_global_batch(stored: dict, spec: JobSpec, run_id: str, echo) -> JobSpec:
    """`spec` with the stored run's global batch: on another worker count grad_accum (or the per-worker batch)
    adapts, as it does inside an elastic run; a spec that changes the global batch itself, or a worker count
    that cannot share it evenly, is refused in one line."""
    train, workers = stored.get("train", {}), stored.get("scaling", {}).get("num_workers", 2)
    before = (train.get("batch_size", 8), train.get("grad_accum", 1))
    total = global_batch(*before, workers)
    now = spec.train
    if global_batch(now.batch_size, now.grad_accum, spec.scaling.num_workers) == total:
        return spec
    if (now.batch_size, now.grad_accum) != before:
        field = "train.batch_size" if now.batch_size != before[0] else "train.grad_accum"
        raise JobSpecError(f"{field}: changes run {run_id}'s global batch ({total} there, "
                           f"{global_batch(now.batch_size, now.grad_accum, spec.scaling.num_workers)} now); start a new run instead")
    low, high = spec.scaling.worker_range
    uneven = uneven_worker_counts(total, low, high)
    if uneven:
        raise JobSpecError(f"scaling.num_workers: run {run_id}: {uneven_counts_message(total, uneven)}")
    batch_size, grad_accum = split_global_batch(total, spec.scaling.num_workers, now.batch_size)
    echo(f"run {run_id} trained on {workers} worker{'s' if workers != 1 else ''}: on {spec.scaling.num_workers}, batch_size {batch_size} × "
         f"grad_accum {grad_accum} keeps its global batch of {total}")
    return spec.model_copy(update={"train": now.model_copy(update={"batch_size": batch_size, "grad_accum": grad_accum})})


def choose_run(storage, spec: JobSpec, run_id: str | None, resume: bool,
               echo: Callable[[str], None] = print) -> tuple[RunLayout, bool, JobSpec]:
    """The run to use, whether it already exists (then it resumes from its last checkpoint), and the spec to
    train it with (the stored run's global batch kept on this spec's worker count)."""
    existing = job_run_ids(storage, spec.name)
    if resume and run_id is None:
        if not existing:
            raise OrchestratorError(f"--resume: job {spec.name} has no run in {storage.uri} to resume")
        run_id = existing[-1]
    if run_id is None:
        return RunLayout(storage, spec.name, new_run_id()), False, spec
    if "/" in run_id or ".." in run_id or not run_id:
        raise OrchestratorError(f"--run-id: {run_id!r} must be a plain name")
    layout = RunLayout(storage, spec.name, run_id)
    if run_id not in existing:
        if resume:
            raise OrchestratorError(f"--resume: run {run_id} of job {spec.name} does not exist in {storage.uri}")
        return layout, False, spec
    try:
        stored = yaml.safe_load(storage.read_bytes(layout.spec))
    except FileNotFoundError:
        raise OrchestratorError(f"run {run_id} exists in {storage.uri} but has no spec.yaml; start a new run") from None
    check_same_run(stored, spec, run_id)
    return layout, True, _keep_global_batch(stored, spec, run_id, echo)


def run(spec: JobSpec, *, local: bool = True, run_id: str | None = None, resume: bool = False,
        echo: Callable[[str], None] = print) -> RunResult:
    """Train the spec's adapter with Ray Train + DeepSpeed and leave the run in object storage."""
    tracker = tracking.connect(spec)  # first: a missing MLflow or an unreachable server fails before anything runs
    resolved = preflight(spec)
    for note in resolved.notes:  # rows data.bad_rows: skip leaves out
        echo(note)
    plan = build_plan(spec, resolved.model_config)
    echo(f"plan: {plan.trainable_parameters:,} trainable of {plan.base_parameters + plan.trainable_parameters:,} "
         f"parameters ({plan.trainable_percent:.3f}%), ZeRO-{spec.deepspeed.zero_stage}, "
         f"{_workers_line(spec)}, global batch {plan.global_batch}")
    if plan.memory is not None:
        echo(f"memory: about {plan.memory.line()}")
    for warning in plan.warnings:  # a plan that may not fit still runs: the estimate is an estimate
        echo(f"warning: {warning}")
    with storage_and_ray(spec, local, echo) as storage_uri:
        storage = open_storage(storage_uri, spec.storage.endpoint_url)
        storage.check_writable()
        if local:
            spec = with_local_cpu_share(spec)
        require_resources(spec)  # Ray Train would otherwise wait forever for workers that cannot be placed
        layout, exists, spec = choose_run(storage, spec, run_id, resume, echo)
        if exists:
            summary = _completed_summary(storage, layout)
            if summary is not None and summary.get("steps") == spec.train.max_steps:
                echo(f"run {layout.uri} is already complete ({spec.train.max_steps} steps)")
                return RunResult(layout.uri, layout.uri + "/adapter", summary)
            # Training on: the old run manifest would claim a completion that is no longer true.
            if storage.exists(layout.manifest):
                storage.fs.rm_file(layout.manifest)
            echo(f"resuming run {layout.uri}")
        else:
            echo(f"new run {layout.uri}")
        storage.write_text(layout.spec, spec_to_yaml(spec))
        config = worker_config(spec, layout, storage_uri, resolved, plan.deepspeed)
        with tracking.logged_run(tracker, layout, echo):
            events = _fit(spec, config, storage, layout, echo)
        summary = _completed_summary(storage, layout)
        if summary is None:
            raise TrainingFailed(f"run {layout.uri} ended without a final manifest")
        echo(f"done: {summary['steps']} steps, final loss {summary['final'].get('loss', float('nan')):.4f}, "
             f"eval_loss {summary['final'].get('eval_loss', float('nan')):.4f}; adapter at {layout.uri}/adapter")
        return RunResult(layout.uri, layout.uri + "/adapter", summary, events)


def _workers_line(spec: JobSpec) -> str:
    low, high = spec.scaling.worker_range
    return f"{high} workers" if low == high else f"{low}-{high} workers (elastic)"


def _completed_summary(storage, layout: RunLayout) -> dict | None:
    if read_manifest(storage, layout.run_dir) is None:
        return None
    try:
        return json.loads(storage.read_bytes(layout.file("summary.json")))
    except FileNotFoundError:
        return None


def worker_config(spec: JobSpec, layout: RunLayout, storage_uri: str, resolved, deepspeed: dict[str, Any]) -> dict[str, Any]:
    """What every worker needs: the validated spec, the plan's DeepSpeed config, resolved paths, and
    where the run lives."""
    return {
        "spec": spec.model_dump(mode="json"), "deepspeed": deepspeed,
        "global_batch": global_batch(spec.train.batch_size, spec.train.grad_accum, spec.scaling.num_workers),
        "job": layout.job, "run_id": layout.run_id, "layout_root": layout.root,
        "storage_uri": storage_uri, "endpoint_url": spec.storage.endpoint_url,
        "model_path": resolved.model_path, "data_path": resolved.data_path, "eval_data_path": resolved.eval_data_path,
    }


def scaling_config(spec: JobSpec):
    """The spec's scaling section as Ray Train's ScalingConfig (one bundle per worker)."""
    from ray.train import ScalingConfig

    low, high = spec.scaling.worker_range
    return ScalingConfig(
        num_workers=(low, high) if low < high else high, use_gpu=spec.scaling.use_gpu,
        resources_per_worker={"CPU": spec.scaling.cpus_per_worker}
        | ({"GPU": spec.scaling.gpus_per_worker} if spec.scaling.use_gpu else {}),
        accelerator_type=spec.scaling.accelerator_type, placement_strategy=spec.scaling.placement_strategy,
    )


def build_trainer(spec: JobSpec, config: dict, layout: RunLayout, storage, callbacks: tuple = ()):
    """One TorchTrainer for one run (or one search trial); Ray Train keeps its state under checkpoints/."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from orchestrator.train.loop import train_loop

    return _trainer_class()(
        train_loop,
        train_loop_config=config,
        scaling_config=scaling_config(spec),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=layout.checkpoints_dir.rsplit("/", 1)[0],
            # Ray uploads checkpoints through this one: patient, so a short store outage is retried.
            storage_filesystem=open_storage(config["storage_uri"], config["endpoint_url"], patient=True).pyarrow_filesystem(),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )


@functools.cache
def _trainer_class():
    """Ray's TorchTrainer, less the dataset manager it starts for every run whether or not it has Ray Datasets: an
    actor process that imports Ray Data, on the path to the first step of every run and every search trial. The
    workers read their data themselves (train/data.py), so a run passes no Ray Dataset and needs none."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
    except ImportError:  # another Ray: its trainer as it is
        return TorchTrainer

    class RunTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]

    return RunTrainer


def fit_off_the_main_thread(trainer) -> None:
    """`trainer.fit()` in a thread while the main thread waits: Ray Train installs its own SIGINT handler (abort the
    run, exit 1) when it runs in the main thread, and the run's handler (launch/stopping.py) must be the one that
    answers Ctrl-C. The main thread wakes twice a second, so a signal is handled at once."""
    outcome: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # handed to the main thread
            outcome.append(error)

    thread = threading.Thread(target=fit, name="orchestrator-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if outcome:
        raise outcome[0]


def _fit(spec: JobSpec, config: dict, storage, layout: RunLayout, echo) -> list[dict]:
    from orchestrator.launch.failures import WorkerWatch, failure_lines
    from orchestrator.launch.stopping import Stopped, stop_on_signal

    def newest_checkpoint() -> int | None:
        return next(iter(layout.complete_checkpoints()), None)

    failure = None
    with ProgressPrinter(echo, newest_checkpoint) as progress, stop_on_signal(echo) as (stop_request, stop_asked):
        trainer = build_trainer(spec, {**config, "progress": progress.queue, "stop_request": stop_request}, layout,
                                storage, callbacks=(WorkerWatch(progress.queue),))
        try:
            fit_off_the_main_thread(trainer)
        except Exception as error:  # Ray Train's TrainingFailedError: every rank's traceback, for the logs
            failure = error
    if failure is not None:  # after the printer has handled every event, the workers' places included
        raise TrainingFailed(failure_lines(failure, progress.events, layout.uri, newest_checkpoint())) from failure
    stopped = [event["step"] for event in progress.events if event.get("event") == "stopped"]
    if stop_asked.is_set() and stopped:
        raise Stopped(f"after step {stopped[-1]} of {spec.train.max_steps}: its checkpoint is in "
                      f"{layout.uri}/checkpoints; `orchestrator run <spec> --run-id {layout.run_id} --resume` goes on from it")
    return progress.events
