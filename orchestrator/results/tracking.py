"""Experiment tracking in MLflow, optional (pip install 'orchestrator[mlflow]'); nothing else imports mlflow.

A search logs through Ray Tune's own `MLflowLoggerCallback` on the Tune driver: one MLflow run per
trial, with the sampled values as params and what each trial reports to Tune (at evaluations and
checkpoints) as metrics, on the optimizer-step axis.

A single run is logged from the driver when training ends, however it ends, from what the run stored.
Ray Train V2 has no MLflow integration for a TorchTrainer (its RunConfig takes only
`ray.train.UserCallback`s), and Ray's `setup_mlflow` on rank 0 would open a new MLflow run at every
worker-group restart and resume, writing a local store on whichever node holds rank 0. Logging the
stored metrics.jsonl instead gives every logged step exactly once, keyed by the run's URI, so a
resumed run continues the same MLflow run.

Default store: `sqlite:///<ORCHESTRATOR_HOME or ~/.cache/orchestrator>/mlflow.db`, MLflow's own
recommended local backend (MLflow 3 refuses its ./mlruns file store, in maintenance mode, unless
MLFLOW_ALLOW_FILE_STORE=true); `MLFLOW_TRACKING_URI` or the spec's `tracking.mlflow.tracking_uri`
point elsewhere, e.g. a tracking server.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from orchestrator.builtin import cache_home
from orchestrator.errors import OrchestratorError, first_line

if TYPE_CHECKING:
    from orchestrator.results.records import RunRecord
    from orchestrator.spec import JobSpec
    from orchestrator.storage.layout import RunLayout

RUN_URI_TAG = "orchestrator.run_uri"
# Settings that say where things go rather than how the adapter is trained.
_NOT_PARAMS = ("name", "storage", "tune", "tracking")
# MLflow's per-call limits for log_batch.
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}


@dataclass(frozen=True)
class MlflowTarget:
    tracking_uri: str
    experiment: str
    experiment_id: str


def default_tracking_uri() -> str:
    return f"sqlite:///{cache_home() / 'mlflow.db'}"


def connect(spec: "JobSpec") -> MlflowTarget | None:
    """The MLflow experiment the spec asks for, created if missing; None when it asks for none.

    Called before anything runs, so a missing package or an unreachable server fails first, in one line."""
    settings = spec.tracking.mlflow if spec.tracking is not None else None
    if settings is None:
        return None
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    experiment = settings.experiment or spec.name
    client = _client(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            # Without an explicit location MLflow puts artifacts in ./mlruns of whatever directory we run in.
            location = (cache_home() / "mlflow-artifacts").as_uri() if uri == default_tracking_uri() else None
            return MlflowTarget(uri, experiment, client.create_experiment(experiment, artifact_location=location))
        return MlflowTarget(uri, experiment, found.experiment_id)
    except ImportError as error:  # a sqlite:// or database store needs SQLAlchemy, which mlflow-skinny leaves out
        raise OrchestratorError(f"tracking.mlflow: the store {uri} needs the {error.name} package; "
                                f"pip install 'orchestrator[mlflow]'") from None
    except Exception as error:
        raise OrchestratorError(f"tracking.mlflow: cannot use MLflow at {uri} ({first_line(error, with_type=True)})") from None


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise OrchestratorError("tracking.mlflow: MLflow is not installed; pip install 'orchestrator[mlflow]' "
                                "(or remove tracking.mlflow from the spec)") from None
    # A new local store announces its schema migrations at INFO on every first use.
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def log_stored_run(target: MlflowTarget, run: "RunRecord", status: str | None = None) -> str:
    """Log a run as stored (spec as params, metrics.jsonl as metrics, where it lives as tags) to its
    MLflow run, created on first call; steps already there are not logged again. Returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator.results.records import flat_settings

    client = _client(target.tracking_uri)
    found = client.search_runs([target.experiment_id], filter_string=f"tags.`{RUN_URI_TAG}` = '{run.uri}'", max_results=1)
    if found:
        run_id, logged_params = found[0].info.run_id, found[0].data.params
        logged_until = max((m.step for m in client.get_metric_history(run_id, "loss")), default=-1)
    else:
        run_id = client.create_run(target.experiment_id, run_name=run.run_id, tags={RUN_URI_TAG: run.uri}).info.run_id
        logged_params, logged_until = {}, -1
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(entry["step"]))
               for entry in run.metrics if entry.get("step", -1) > logged_until
               for key, value in entry.items() if key != "step" and _is_number(value)]
    best = run.best()
    if metrics and best is not None:
        metrics.append(Metric("best_eval_loss", best[1], now, best[0]))
    params = {key: _param(value) for key, value in flat_settings(run.spec) if key.split(".")[0] not in _NOT_PARAMS}
    for key in ("trainable_parameters", "total_parameters"):
        if (run.summary or {}).get(key) is not None:
            params[key] = str(run.summary[key])
    # Params are write-once in MLflow: a resume that grew train.max_steps keeps the first value.
    params = {key: value for key, value in params.items() if key not in logged_params}
    tags = {"orchestrator.job": run.setting("name", run.name), "orchestrator.status": run.status,
            "orchestrator.adapter_uri": run.adapter_uri or ""}
    _log_batches(client, run_id, metrics, [Param(k, v) for k, v in params.items()], [RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status or ("FINISHED" if run.complete else "FAILED"))
    return run_id


@contextmanager
def logged_run(target: MlflowTarget | None, layout: "RunLayout", echo=print) -> Iterator[None]:
    """Log the run to MLflow when the block ends: FINISHED when it completed, KILLED when interrupted,
    else FAILED. A tracking failure is reported, never raised: the run itself is intact in storage."""
    if target is None:
        yield
        return
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        try:
            from orchestrator.results.records import load_result

            run = load_result(layout.storage, layout.path)
            status = "FINISHED" if run.complete else "KILLED" if interrupted else "FAILED"
            mlflow_run = log_stored_run(target, run, status)
            echo(f"mlflow: run {mlflow_run} ({status.lower()}) in experiment {target.experiment!r} at {target.tracking_uri}")
        except Exception as error:
            echo(f"mlflow: could not log run {layout.uri} ({first_line(error, with_type=True)}); it is intact in storage")


def tune_callbacks(target: MlflowTarget | None, keys: dict[str, str], search_uri: str) -> list:
    """Ray Tune's MLflow logger for a search (empty without tracking); `keys`: Tune's names → dotted spec paths."""
    if target is None:
        return []
    from orchestrator.results.tune_tracking import SearchMLflowLogger

    return [SearchMLflowLogger(keys, target.tracking_uri, experiment_name=target.experiment,
                               tags={"orchestrator.search_uri": search_uri})]


def _log_batches(client, run_id: str, metrics: list, params: list, tags: list) -> None:
    for start in range(0, max(len(metrics), len(params), len(tags), 1), _BATCH["params"]):
        client.log_batch(run_id, params=params[start:start + _BATCH["params"]], tags=tags[start:start + _BATCH["tags"]])
    for start in range(0, len(metrics), _BATCH["metrics"]):
        client.log_batch(run_id, metrics=metrics[start:start + _BATCH["metrics"]])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
