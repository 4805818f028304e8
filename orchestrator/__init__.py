"""orchestrator: fine-tune parameter-efficient adapters with Ray Train + DeepSpeed, results in object storage.

The Python API; the `orchestrator` command is a thin layer over it. Each function is the real one (its
signature and docstring are those of its module), imported on first use so that `import orchestrator`
stays light:

    load_spec(path, overrides) -> JobSpec         a YAML job spec, validated
    plan(spec) -> Plan                            DeepSpeed config, resources, trainable parameters; `Plan.summary()`
    run(spec, local=False, ...) -> RunResult      one fine-tuning run (local: Ray and an S3 store in-process)
    tune(spec, local=False, resume=False) -> TuneResult   a Ray Tune search over the spec's tune.space
    export(run_uri, out, merged=False) -> Path    a run's or trial's adapter (PEFT format), or the merged model
    runs(storage_uri=None, job=..., ...) -> [RunRecord | SearchRecord]   what storage holds, newest first
    show(run_uri, ...) -> Report                  one run's (or search's) record and loss curves (PNG)
    compare([run_uri, ...], ...) -> Comparison    several runs (or a search's trials) side by side
    submit(spec, address=None, tune=False, ...) -> Submission   a run or search on a running Ray cluster
    list_jobs(address=None) · status(id) · logs(id, follow=False) · stop(id)   submitted jobs
    serve_store(data_dir=None)                    the embedded S3 store in the foreground (a head's storage)
    up(idle_timeout_min=30, cpus=None) · down()   a warm local runtime (Ray and the store) that `run(local=True)` joins
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from orchestrator.errors import JobSpecError, OrchestratorError, PreflightError, StorageError
from orchestrator.spec import JobSpec, load_spec

if TYPE_CHECKING:
    from orchestrator.results.export import export
    from orchestrator.launch.jobs import list_jobs, logs, status, stop
    from orchestrator.results.report import compare, runs, show
    from orchestrator.launch.run import run
    from orchestrator.launch.runtime import serve_store
    from orchestrator.launch.submit import submit
    from orchestrator.launch.tune import tune
    from orchestrator.launch.warm import down, up

__version__ = "0.1.0"

# name → module that defines it: resolved on first attribute access (PEP 562), then cached here.
_LAZY = {
    "run": "orchestrator.launch.run",
    "tune": "orchestrator.launch.tune",
    "export": "orchestrator.results.export",
    "submit": "orchestrator.launch.submit",
    "runs": "orchestrator.results.report",
    "show": "orchestrator.results.report",
    "compare": "orchestrator.results.report",
    "list_jobs": "orchestrator.launch.jobs",
    "status": "orchestrator.launch.jobs",
    "logs": "orchestrator.launch.jobs",
    "stop": "orchestrator.launch.jobs",
    "serve_store": "orchestrator.launch.runtime",
    "up": "orchestrator.launch.warm",
    "down": "orchestrator.launch.warm",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


# The module orchestrator.plan would replace the function below as this package's attribute when it is first
# imported (Python binds a loaded submodule to its parent): import it now, so that the function comes last.
from orchestrator.plan import Plan  # noqa: E402  isort: skip


def plan(spec: JobSpec) -> Plan:
    """The job's plan: resolved DeepSpeed config, resources per worker and in total, and the exact
    trainable-parameter count (the adapter attached to the model on the meta device). Reads the model's
    config (a local directory, a built-in model, or the hub); starts nothing. Print it with `.summary()`."""
    from orchestrator.launch.preflight import load_model_config
    from orchestrator.plan import build_plan

    _, model_config = load_model_config(spec)
    return build_plan(spec, model_config)



__all__ = ["JobSpec", "JobSpecError", "OrchestratorError", "Plan", "PreflightError", "StorageError", "compare", "down",
           "export", "list_jobs", "load_spec", "logs", "plan", "run", "runs", "serve_store", "show", "status", "stop",
           "submit", "tune", "up"]
