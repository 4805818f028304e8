"""MLflow tracking: a stored run is logged with the values it stored, once; a search logs through Ray
Tune's MLflowLoggerCallback; a spec asking for MLflow without it installed fails before anything runs. (A real
run's logging is checked in tests/test_results.py, on the runs that test trains.)"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import pytest
from mlflow.tracking import MlflowClient

import orchestrator
from orchestrator.results import tracking
from orchestrator.cli import main
from orchestrator.errors import JobSpecError, OrchestratorError
from orchestrator.results.records import load_result
from orchestrator.spec import spec_to_yaml, validate_spec
from orchestrator.storage.fs import open_storage
from orchestrator.storage.layout import RunLayout
from tests.helpers import MINIMAL_SPEC, make_spec, training_metrics, write_run


def tracked(storage_uri: str, tracking_uri: str, **overrides) -> orchestrator.JobSpec:
    return make_spec(storage_uri, tracking={"mlflow": {"tracking_uri": tracking_uri}}, **overrides)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


class FakeTrial:
    """What Tune's logger callbacks use of a trial: its config, and its name as str()."""

    def __init__(self, name: str, config: dict):
        self.name, self.config = name, config

    def __str__(self) -> str:
        return self.name


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def storage_uri(tmp_path) -> str:
    """Where runs written by hand are stored: a local folder, since these tests check what MLflow is told."""
    return f"file://{tmp_path}/store"


def test_a_stored_run_is_logged_with_the_metrics_it_stored(storage_uri, mlflow_uri):
    spec = tracked(storage_uri, mlflow_uri, optim={"lora_plus_ratio": 4})
    storage = open_storage(storage_uri)
    metrics = training_metrics(12, 6, start_loss=5.0)
    write_run(storage, "runs/it/r1", spec, metrics)
    target = tracking.connect(spec)
    assert (target.tracking_uri, target.experiment) == (mlflow_uri, "it")

    run_id = tracking.log_stored_run(target, load_result(storage, "runs/it/r1"))

    client = MlflowClient(mlflow_uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "r1"
    for key in ("loss", "eval_loss", "tokens_per_s", "lr"):
        assert history(client, run_id, key) == [(m["step"], pytest.approx(m[key])) for m in metrics if key in m], key
    assert history(client, run_id, "best_eval_loss") == [(12, pytest.approx(5.1 - 0.04 * 12))]
    params = logged.data.params
    assert (params["adapter.r"], params["optim.lora_plus_ratio"], params["train.max_steps"]) == ("8", "4.0", "12")
    assert params["trainable_parameters"] == "65536" and not any(k.startswith(("storage.", "tracking.")) for k in params)
    assert logged.data.tags[tracking.RUN_URI_TAG] == f"{storage_uri}/runs/it/r1"
    assert logged.data.tags["orchestrator.adapter_uri"] == f"{storage_uri}/runs/it/r1/adapter"

    assert tracking.log_stored_run(target, load_result(storage, "runs/it/r1")) == run_id
    assert len(client.get_metric_history(run_id, "loss")) == len(metrics), "logging again adds nothing"


def test_a_resumed_run_continues_its_mlflow_run(storage_uri, mlflow_uri):
    spec = tracked(storage_uri, mlflow_uri)
    storage = open_storage(storage_uri)
    metrics = training_metrics(12, 6, start_loss=5.0)
    target = tracking.connect(spec)
    write_run(storage, "runs/it/r2", spec, metrics[:2], complete=False)
    first = tracking.log_stored_run(target, load_result(storage, "runs/it/r2"))
    client = MlflowClient(mlflow_uri)
    assert client.get_run(first).info.status == "FAILED"

    write_run(storage, "runs/it/r2", spec, metrics)  # the resumed run finished
    assert tracking.log_stored_run(target, load_result(storage, "runs/it/r2")) == first
    assert history(client, first, "loss") == [(m["step"], pytest.approx(m["loss"])) for m in metrics]
    assert client.get_run(first).info.status == "FINISHED"


@pytest.mark.parametrize("raised, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED"), (None, "FINISHED")])
def test_logged_run_records_how_training_ended(storage_uri, mlflow_uri, raised, status):
    spec = tracked(storage_uri, mlflow_uri)
    storage = open_storage(storage_uri)
    write_run(storage, "runs/it/r3", spec, training_metrics(12, 6, start_loss=5.0), complete=raised is None)
    said: list[str] = []
    target = tracking.connect(spec)
    with pytest.raises(raised) if raised else nullcontext():
        with tracking.logged_run(target, RunLayout(storage, "it", "r3"), said.append):
            if raised:
                raise raised()
    [logged] = MlflowClient(mlflow_uri).search_runs([target.experiment_id])
    assert logged.info.status == status
    assert said == [f"mlflow: run {logged.info.run_id} ({status.lower()}) in experiment 'it' at {mlflow_uri}"]


def test_a_tracking_failure_never_hides_the_run(storage_uri, mlflow_uri):
    spec = tracked(storage_uri, mlflow_uri)
    target = tracking.connect(spec)
    said: list[str] = []
    # No such run in storage: logging fails, the block's own outcome stands.
    with tracking.logged_run(target, RunLayout(open_storage(storage_uri), "it", "missing"), said.append):
        pass
    assert len(said) == 1 and said[0].startswith(f"mlflow: could not log run {storage_uri}/runs/it/missing (")


def test_default_store_is_sqlite_in_orchestrators_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = make_spec("s3://bucket/p", tracking={"mlflow": {}})
    target = tracking.connect(spec)
    assert target.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and (tmp_path / "mlflow.db").exists()
    experiment = MlflowClient(target.tracking_uri).get_experiment(target.experiment_id)
    assert experiment.name == "it" and experiment.artifact_location == (tmp_path / "mlflow-artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert tracking.connect(spec).tracking_uri == f"sqlite:///{tmp_path / 'elsewhere.db'}"


def test_no_tracking_section_means_no_mlflow():
    assert tracking.connect(make_spec("s3://bucket/p")) is None
    assert tracking.tune_callbacks(None, {}, "s3://x/tune/s") == []


def test_credentials_in_the_tracking_uri_are_refused():
    raw = make_spec(base=MINIMAL_SPEC, raw=True, tracking={"mlflow": {"tracking_uri": "https://me:secret@mlflow.example.com"}})
    with pytest.raises(JobSpecError, match="tracking.mlflow.tracking_uri: must not hold credentials; set MLFLOW_TRACKING_USERNAME"):
        validate_spec(raw)


def test_mlflow_missing_fails_in_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    spec = tracked(f"file://{tmp_path}/store", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "job.yaml").write_text(spec_to_yaml(spec))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)

    def preflight(spec):
        raise AssertionError("preflight ran: the MLflow check must come first")

    monkeypatch.setattr("orchestrator.launch.run.preflight", preflight)
    monkeypatch.setattr("orchestrator.launch.tune.preflight", preflight)
    assert main(["run", str(tmp_path / "job.yaml"), "--local"]) == 2
    error = capsys.readouterr().err
    assert error == "error: tracking.mlflow: MLflow is not installed; pip install 'orchestrator[mlflow]' (or remove tracking.mlflow from the spec)\n"
    with pytest.raises(OrchestratorError, match="MLflow is not installed"):
        orchestrator.tune(validate_spec({**spec.model_dump(mode="json"), "tune": {"space": {"optim.lr": {"choice": [1e-3]}}}}))
    assert not (tmp_path / "store").exists()


def test_search_logger_logs_each_trial_on_the_step_axis_with_dotted_names(mlflow_uri):
    target = tracking.connect(tracked("s3://bucket/p", mlflow_uri))
    [logger] = tracking.tune_callbacks(target, {"p0": "adapter.r", "p1": "optim.lr"}, "s3://bucket/p/tune/s")
    logger.setup()
    for trial in (FakeTrial(f"run_trial_{r}", {"p0": r, "p1": 1e-3}) for r in (4, 8)):
        logger.log_trial_start(trial)
        # What a trial reports to Tune at its evaluations: the optimizer step, not Tune's report count.
        for iteration, step in enumerate((6, 12), 1):
            logger.log_trial_result(iteration, trial, {"step": step, "eval_loss": 5.0 - step / trial.config["p0"],
                                                        "training_iteration": iteration})
        logger.log_trial_end(trial)
    client = MlflowClient(mlflow_uri)
    runs = {run.info.run_name: run for run in client.search_runs([target.experiment_id])}
    assert set(runs) == {"run_trial_4", "run_trial_8"}
    for r in (4, 8):
        run = runs[f"run_trial_{r}"]
        assert run.data.params["adapter.r"] == str(r) and run.data.params["optim.lr"] == "0.001"
        assert run.data.tags["orchestrator.search_uri"] == "s3://bucket/p/tune/s" and run.info.status == "FINISHED"
        assert history(client, run.info.run_id, "eval_loss") == [(6, pytest.approx(5 - 6 / r)), (12, pytest.approx(5 - 12 / r))]


@pytest.mark.slow
def test_a_real_search_logs_every_trial_to_mlflow(ray_session, s3_storage_uri, mlflow_uri):
    spec = tracked(
        s3_storage_uri, mlflow_uri,
        train={"max_steps": 12, "batch_size": 8, "eval_every": 6, "eval_batches": 1, "checkpoint_every": 6, "log_every": 6},
        scaling={"num_workers": 1, "cpus_per_worker": 0.5},  # both trials at once on the tests' 2 CPUs
        tune={"name": "tracked", "num_samples": 1, "space": {"adapter.r": {"grid": [4, 8]}}, "scheduler": {"type": "fifo"}},
    )
    result = orchestrator.tune(spec, echo=print)
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("it")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`orchestrator.search_uri` = "
                              f"'{result.search_uri}'")
    assert sorted(run.data.params["adapter.r"] for run in runs) == ["4", "8"]
    by_rank = {row["params"]["adapter.r"]: row for row in result.leaderboard}
    for run in runs:
        eval_history = history(client, run.info.run_id, "eval_loss")
        assert [step for step, _ in eval_history] == [6, 12]
        assert min(v for _, v in eval_history) == pytest.approx(by_rank[int(run.data.params["adapter.r"])]["best_eval_loss"])
