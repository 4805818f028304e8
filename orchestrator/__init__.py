"""orchestrator: fine-tune parameter-efficient adapters with Ray Train + DeepSpeed, results in object storage.

Public Python API (the CLI is a thin layer over it):
    load_spec(path, overrides) -> JobSpec
    plan(spec) -> Plan            pure: DeepSpeed config, resources, trainable-parameter estimate
    run(spec, local=True, ...) -> RunResult
    tune(spec, local=True, resume=False) -> TuneResult   Ray Tune search over the spec's tune.space
    export(run_uri, out, merged=False) -> Path   a run's or trial's adapter (PEFT format) or the merged model
    submit(spec, address=None, tune=False, follow=False, ...) -> Submission   a Ray job on a running cluster
    runs(storage_uri=None, job=None, method=None, since=None) -> [RunRecord | SearchRecord]   newest first
    show(run_uri, out=None) -> Report       a run's (or search's) record, packages, and its loss curves as PNG
    compare([run_uri, ...], out=None) -> Comparison   several runs (or a search's trials): table rows and one plot
"""

from orchestrator.errors import JobSpecError, OrchestratorError, PreflightError, StorageError
from orchestrator.spec import JobSpec, load_spec

__version__ = "0.1.0"


def plan(spec: JobSpec):
    """The resolved plan, with the model's config read to estimate trainable parameters."""
    from orchestrator.launch.preflight import load_model_config
    from orchestrator.plan import build_plan

    _, model_config = load_model_config(spec)
    return build_plan(spec, model_config)


def run(spec: JobSpec, **options):
    from orchestrator.launch.run import run as _run

    return _run(spec, **options)


def tune(spec: JobSpec, **options):
    from orchestrator.launch.tune import tune as _tune

    return _tune(spec, **options)


def export(run_uri: str, out, **options):
    from orchestrator.launch.export import export as _export

    return _export(run_uri, out, **options)


def submit(spec: JobSpec, **options):
    from orchestrator.launch.submit import submit as _submit

    return _submit(spec, **options)


def runs(storage_uri: str | None = None, **options):
    from orchestrator.launch.report import runs as _runs

    return _runs(storage_uri, **options)


def show(run_uri: str, **options):
    from orchestrator.launch.report import show as _show

    return _show(run_uri, **options)


def compare(run_uris, **options):
    from orchestrator.launch.report import compare as _compare

    return _compare(run_uris, **options)


__all__ = ["JobSpec", "JobSpecError", "OrchestratorError", "PreflightError", "StorageError", "compare", "export",
           "load_spec", "plan", "run", "runs", "show", "submit", "tune"]
