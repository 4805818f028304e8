"""One search trial: an ordinary run under tune/<search>/trials/<trial-id>/, whose results go to Ray Tune.

Tune's pausing schedulers (HyperBand, PBT) stop a trial's actor and start it again later. Tune learns of a
trial's checkpoints through pointers: a one-file Tune checkpoint naming the run checkpoint in storage, so the
weights are written once, where the run keeps them. A trial started again with a pointer to its own checkpoint
simply resumes (the worker loop takes its newest complete checkpoint). One started with another trial's pointer
(PBT exploited it) first adopts that checkpoint and its metrics, then records the mutation: params.json holds the
trial's current values and mutations.json every change, with the step and the trial it came from.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.launch.run import build_trainer, check_same_run, worker_config
from orchestrator.plan import build_plan
from orchestrator.search import trial_raw
from orchestrator.search.schedulers import PAUSING, perturbed_fields, scheduler_rungs
from orchestrator.spec import JobSpec, spec_to_yaml, validate_spec
from orchestrator.storage.fs import open_storage
from orchestrator.storage.layout import RunLayout, trial_layout
from orchestrator.storage.manifest import is_complete

POINTER = "pointer.json"
# How long an adopting trial waits for the copied trial's checkpoint to be whole: Tune hears of a checkpoint when
# its files are uploaded, a moment before rank 0 writes its manifest.
ADOPT_WAIT_S = 120.0


def run_trial(sampled: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune trainable: one trial = one TorchTrainer run under tune/<search>/trials/<trial-id>/."""
    from ray import tune

    values = {context["keys"][name]: value for name, value in sampled.items() if name in context["keys"]}
    spec = validate_spec(trial_raw(context["base"], values), source=f"trial {values}")
    trial_id = tune.get_context().get_trial_id()
    storage = open_storage(context["storage_uri"], spec.storage.endpoint_url)
    layout = trial_layout(storage, context["search"], trial_id)
    pointer = read_pointer(tune.get_checkpoint())
    if pointer is not None and pointer["trial"] != trial_id:
        adopt(storage, context["search"], layout, pointer, values)
    record_trial(storage, layout, spec, values, perturbed_fields(context["tune"]))
    # The trial's own plan: a search may vary what the DeepSpeed config depends on (batch, ZeRO stage).
    config = worker_config(spec, layout, context["storage_uri"], context["resolved"], build_plan(spec).deepspeed)
    config["scheduler_rungs"] = scheduler_rungs(context["tune"], spec.train)
    pausing = context["tune"].scheduler.type in PAUSING
    _fit_and_report(spec, config, layout, storage, trial_id, context["tune"].metric, pausing)


def _fit_and_report(spec: JobSpec, config: dict, layout: RunLayout, storage, trial_id: str, metric: str, pausing: bool) -> None:
    """Fit in a thread; hand each report to Tune from this one (the trial's Tune session), a checkpoint as its pointer.
    Under a pausing scheduler Tune sees checkpoints only, and the workers wait at each until Tune lets them go on
    (train/control.py's SchedulerGate): `tune.report` returns only then."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    gate = Queue(actor_options={"num_cpus": 0}) if pausing else None
    trainer = build_trainer(spec, {**config, "scheduler_gate": gate}, layout, storage, callbacks=(TrialReporter(reports),))
    reported = ReportLog(storage, layout, metric)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # raised in the trial's thread below
            failure.append(error)

    def report(metrics: dict, checkpointed: bool) -> None:
        reported.add(metrics)
        if not checkpointed:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as scratch:
            Path(scratch, POINTER).write_text(json.dumps({"trial": trial_id, "step": metrics["step"]}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(scratch))

    fitting = threading.Thread(target=fit, name="orchestrator-trial-fit", daemon=True)
    fitting.start()
    last: Optional[tuple[dict, bool]] = None
    while fitting.is_alive() or not reports.empty():
        try:
            metrics, checkpointed = reports.get(timeout=1.0)
        except Empty:
            continue
        if metrics["step"] >= spec.train.max_steps:
            # Held back until the run has published its adapter and summary: at max_steps a scheduler stops the
            # trial, and stopping it kills the workers wherever they are.
            last = (metrics, checkpointed)
        elif checkpointed or not pausing:
            report(metrics, checkpointed)
        if checkpointed and gate is not None:
            gate.put(True)
    if failure:
        raise failure[0]
    if last is not None:
        report(*last)


class ReportLog:
    """reported.jsonl: every result the trial gave its scheduler, with the step its run (re)started from. Tune's own
    record of a trial is rolled back when it is restored from a checkpoint; this one keeps what was trained."""

    def __init__(self, storage, layout: RunLayout, metric: str):
        self.storage, self.path, self.metric = storage, layout.file("reported.jsonl"), metric
        try:
            self.lines = storage.read_bytes(self.path).decode().splitlines()
        except FileNotFoundError:
            self.lines = []

    def add(self, metrics: dict) -> None:
        entry = {"step": metrics["step"], "resumed_from_step": metrics.get("resumed_from_step", 0),
                 self.metric: metrics.get(self.metric)}
        self.lines.append(json.dumps(entry))
        self.storage.write_text(self.path, "\n".join(self.lines) + "\n")


try:
    from ray.train.v2.api.callback import UserCallback
except ImportError:  # Ray without Train V2: the search refuses to start before any trial does
    UserCallback = object  # type: ignore[misc, assignment]


class TrialReporter(UserCallback):
    """Ray Train → the trial's Tune session: each report's metrics, and whether it carried a checkpoint.
    Ray's TuneReportCallback passes a checkpoint as a metric only, which no scheduler can continue a trial from."""

    def __init__(self, reports):
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.reports.put((dict(metrics[0]), checkpoint is not None))


def read_pointer(checkpoint) -> Optional[dict[str, Any]]:
    """The trial and step a Tune checkpoint points at; None for a trial starting fresh."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory, POINTER)
        return json.loads(path.read_text()) if path.exists() else None


def adopt(storage, search: str, layout: RunLayout, pointer: dict[str, Any], values: dict[str, Any]) -> None:
    """PBT chose this trial to continue from trial `pointer["trial"]`'s checkpoint: that checkpoint and its metrics
    replace this trial's own (Tune has already moved its own progress aside), and the mutation is recorded."""
    mutations = _read_json(storage, layout.file("mutations.json"), [])
    if mutations and (mutations[-1]["from_trial"], mutations[-1]["step"]) == (pointer["trial"], pointer["step"]):
        return  # adopted already; this trial was paused and started again since
    source = trial_layout(storage, search, pointer["trial"])
    step = _whole_checkpoint(source, pointer["step"])
    storage.remove_dir(layout.checkpoints_dir)  # Ray Train's state of this run, and the checkpoints PBT discards
    storage.copy_dir(source.checkpoint(step), layout.checkpoint(step))
    storage.write_bytes(layout.metrics, storage.read_bytes(source.metrics))  # the resume keeps steps ≤ its own
    before = _read_json(storage, layout.file("params.json"), {})
    mutations.append({"step": step, "from_trial": pointer["trial"], "before": before, "after": values})
    storage.write_text(layout.file("mutations.json"), json.dumps(mutations, indent=2))


def _whole_checkpoint(source: RunLayout, step: int) -> int:
    """`step` once its manifest is there; if it never comes, the newest whole checkpoint before it."""
    deadline = time.monotonic() + ADOPT_WAIT_S
    while not is_complete(source.storage, source.checkpoint(step)):
        if time.monotonic() > deadline:
            earlier = [s for s in source.complete_checkpoints() if s < step]
            if not earlier:
                raise OrchestratorError(f"pbt: trial {source.run_id}'s checkpoint at step {step} never completed "
                                        f"in {source.uri}/checkpoints, and it has no earlier one to copy")
            return earlier[0]
        time.sleep(1.0)
    return step


def record_trial(storage, layout: RunLayout, spec: JobSpec, values: dict[str, Any], may_change: tuple[str, ...]) -> None:
    """spec.yaml and params.json (the trial's current values). A trial started again must be the same run: only
    the fields its scheduler perturbs may differ from the spec it stored (a resumed search with an edited job
    spec is refused, naming the field)."""
    if storage.exists(layout.spec):
        stored = yaml.safe_load(storage.read_bytes(layout.spec))
        check_same_run(stored, spec, f"trial {layout.run_id}", may_change)
        if _read_json(storage, layout.file("params.json"), None) == values:
            return
    storage.write_text(layout.spec, spec_to_yaml(spec))
    storage.write_text(layout.file("params.json"), json.dumps(values, indent=2))


def _read_json(storage, path: str, default: Any) -> Any:
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return default
