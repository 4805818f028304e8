"""`orchestrator submit` and its companions: a run or a search sent to a running Ray cluster.

The entrypoint on the cluster is the same CLI a local run uses (`python -m orchestrator run|tune
job.yaml`), so a cluster job follows the same code path. The resolved spec travels in the job's
working_dir; this package travels as a py_module (or comes from the cluster's image, when the
user's runtime env says so). Object-store settings travel as the runtime env's env vars; the
secrets among them do not, because Ray writes a job's runtime env into its logs in plain text.
They travel as a file in the working_dir (stored in the cluster's GCS like the job's code) that a
`sitecustomize` hook next to it loads into the environment of each of the job's processes at start
(Ray puts the working_dir on their PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

import orchestrator
from orchestrator.errors import JobSpecError, first_line
from orchestrator.launch.cluster_client import Cluster, ClusterError, connect, shortfall
from orchestrator.plan import cluster_needs, worker_resources
from orchestrator.spec import JobSpec, spec_to_yaml
from orchestrator.storage.layout import new_run_id

# Secrets: sent in the job's working_dir (see above), and not at all when the cluster's own role is used.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")
# Where the store is: not secret, always passed along when set.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# `submit --follow` and `logs --follow` exit with the job's outcome.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
SPEC_FILE = "job.yaml"
PACKAGE_DIR = Path(orchestrator.__file__).resolve().parent


@dataclass
class Submission:
    submission_id: str
    dashboard_link: str
    results_uri: str
    status: str | None = None  # the final status when followed


def check_cluster_storage(spec: JobSpec) -> None:
    """A cluster's nodes must all reach the run's storage."""
    uri = spec.storage.uri
    if uri is None:
        raise JobSpecError("storage.uri: a cluster job needs storage every node can reach (s3://bucket/prefix); "
                           "the embedded object store exists only on this machine")
    if uri.startswith("file://") and not spec.storage.shared_filesystem:
        raise JobSpecError(f"storage.uri: {uri} is local to one machine; use s3://… or, if every node mounts it, "
                           "set storage.shared_filesystem: true")


CREDENTIALS_FILE = "orchestrator_credentials.json"
STOP_GRACE_S = 600
_LOADER = f"""\
# Written by `orchestrator submit`: puts the credentials this job was given into the environment of
# each of its processes (Ray puts the job's working_dir on their PYTHONPATH, so Python imports this
# at start). They are not in the runtime env's env_vars because Ray logs those in plain text.
import json as _json, os as _os
try:
    with open(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "{CREDENTIALS_FILE}")) as _file:
        _os.environ.update(_json.load(_file))
except FileNotFoundError:
    pass
"""


def _present(names: tuple[str, ...]) -> dict[str, str]:
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def build_runtime_env(staging_dir: Path, spec: JobSpec, user_env: dict[str, Any] | None,
                      cluster_credentials: bool) -> dict[str, Any]:
    """The job's runtime env: working_dir with the spec (and the caller's credentials unless the
    cluster's own role is to be used), this package, storage settings as env vars. `user_env`
    overrides any key (env_vars are merged), e.g. `py_modules: []` with `pip: [...]`."""
    (staging_dir / SPEC_FILE).write_text(spec_to_yaml(spec))
    secrets = {} if cluster_credentials else _present(CREDENTIAL_ENV)
    if secrets:
        path = staging_dir / CREDENTIALS_FILE
        path.touch(mode=0o600)
        path.write_text(json.dumps(secrets))
        (staging_dir / "sitecustomize.py").write_text(_LOADER)
    runtime_env: dict[str, Any] = {
        "working_dir": str(staging_dir),
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": ["__pycache__", "*.pyc"],
        # `orchestrator stop` SIGTERMs the entrypoint, which has the workers checkpoint the step they are on and
        # stop (train/control.py); Ray's job supervisor SIGKILLs it after this many seconds (its default: 3).
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S), **_present(STORAGE_ENV)},
    }
    for key, value in (user_env or {}).items():
        runtime_env[key] = {**runtime_env["env_vars"], **value} if key == "env_vars" else value
    return runtime_env


def entrypoint(kind: str, run_id: str | None, resume: bool) -> str:
    command = ["python", "-m", "orchestrator", kind, SPEC_FILE]
    if run_id:
        command += ["--run-id", run_id]
    if resume:
        command.append("--resume")
    return shlex.join(command)


def load_runtime_env(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise JobSpecError(f"{path}: cannot read runtime env ({error.strerror})") from None
    except yaml.YAMLError:
        raise JobSpecError(f"{path}: runtime env is not valid YAML/JSON") from None
    if not isinstance(loaded, dict):
        raise JobSpecError(f"{path}: a runtime env must be a mapping (working_dir, pip, env_vars, …)")
    if not isinstance(loaded.get("env_vars", {}), dict):
        raise JobSpecError(f"{path}: env_vars must be a mapping")
    return loaded


def submit(spec: JobSpec, *, address: str | None = None, tune: bool = False, run_id: str | None = None,
           resume: bool = False, follow: bool = False, runtime_env: dict[str, Any] | None = None,
           cluster_credentials: bool = False, echo: Callable[[str], None] = print) -> Submission:
    """Submit the spec as a Ray job (a run, or with `tune` a search); with `follow`, stream its logs to the end."""
    if tune and spec.tune is None:
        raise JobSpecError("tune: this job has no tune section (a search space, num_samples, scheduler)")
    if tune and run_id:
        raise JobSpecError("--run-id: a search is named by tune.name, not by a run id")
    check_cluster_storage(spec)
    cluster = connect(address)
    _warn_if_it_does_not_fit(cluster, spec, echo)
    kind = "tune" if tune else "run"
    if tune:
        run_id = None
        results_uri = f"{spec.storage.uri}/tune/{spec.tune.name or spec.name}"
    else:
        run_id = run_id or (None if resume else new_run_id())
        results_uri = f"{spec.storage.uri}/runs/{spec.name}/{run_id or '<latest>'}"
    submission_id = f"{spec.name}-{kind}-{new_run_id()}"
    with tempfile.TemporaryDirectory(prefix="orchestrator-submit-") as staging:
        env = build_runtime_env(Path(staging), spec, runtime_env, cluster_credentials)
        _submit_when_an_agent_is_up(cluster, echo, entrypoint=entrypoint(kind, run_id, resume), runtime_env=env,
                                    submission_id=submission_id, metadata={
                                        "orchestrator": orchestrator.__version__, "kind": kind, "job": spec.name,
                                        "results": results_uri})
    submission = Submission(submission_id, cluster.job_link(submission_id), results_uri)
    low, high = spec.scaling.worker_range
    workers = f"{high} workers" if low == high else f"{low}-{high} workers, elastic"
    echo(f"submitted {submission_id} ({kind} of {spec.name}, {workers}) to {cluster.url}")
    echo(f"  dashboard: {submission.dashboard_link}")
    echo(f"  results:   {results_uri}")
    echo(f"  follow:    orchestrator logs {submission_id} --follow --address {cluster.url}")
    if follow:
        submission.status = follow_logs(cluster, submission_id, echo)
    return submission


def _submit_when_an_agent_is_up(cluster: Cluster, echo, **job) -> None:
    """Submit; while a head that has just started has no job agent yet (Ray answers 500 "No available
    agent to submit job, please try again later" for its first seconds), wait for one."""
    deadline = time.monotonic() + AGENT_WAIT_S
    for attempt in itertools.count():
        try:
            cluster.client.submit_job(**job)
            return
        except Exception as error:  # Ray raises RuntimeError with the server's text (e.g. a bad runtime env)
            if NO_AGENT_YET not in str(error) or time.monotonic() > deadline:
                raise ClusterError(f"cluster {cluster.url} refused the job: {first_line(error)}") from None
            if attempt == 0:
                echo(f"the cluster has no job agent yet (a head that just started); waiting up to {AGENT_WAIT_S} s")
            time.sleep(AGENT_RETRY_S)


NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S, AGENT_RETRY_S = 60, 2


def _warn_if_it_does_not_fit(cluster: Cluster, spec: JobSpec, echo) -> None:
    try:
        total, per_node = cluster.resources()
    except Exception as error:
        echo(f"note: could not read the cluster's resources ({first_line(error)}); not checking that the job fits")
        return
    fewest = spec.scaling.worker_range[0]  # an elastic job starts once min_workers fit
    problem = shortfall(cluster_needs(spec, fewest), worker_resources(spec), fewest, total, per_node)
    if problem:
        echo(f"warning: the cluster cannot hold this job right now: {problem}. It will wait for the autoscaler "
             f"(if any) to add nodes; `orchestrator plan` shows what it needs")


def follow_logs(cluster: Cluster, submission_id: str, echo: Callable[[str], None] = print) -> str:
    """Stream the job's logs until it ends; return its final status."""

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(submission_id):
            for line in chunk.splitlines():
                echo(line)

    job_info(cluster, submission_id)  # a one-line error for an unknown id, before any streaming
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        echo(f"stopped following; {submission_id} goes on (orchestrator stop {submission_id} --address {cluster.url})")
        raise
    status = wait_for_end(cluster, submission_id, timeout_s=30)
    info = job_info(cluster, submission_id)
    echo(f"{submission_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""))
    return status


def wait_for_end(cluster: Cluster, submission_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(job_info(cluster, submission_id).status.value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def job_info(cluster: Cluster, submission_id: str):
    try:
        return cluster.client.get_job_info(submission_id)
    except Exception as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise ClusterError(f"no job {submission_id!r} on cluster {cluster.url} (`orchestrator list` shows them)") from None
        raise ClusterError(f"cluster {cluster.url}: {first_line(error)}") from None


def stop(cluster: Cluster, submission_id: str, wait_s: float = 30, echo=print) -> str:
    """Ask the job to stop (SIGTERM: the run unwinds, keeping its last complete checkpoint) and wait for it."""
    status = str(job_info(cluster, submission_id).status.value)
    if status in TERMINAL:
        echo(f"{submission_id} has already ended: {status}")
        return status
    cluster.client.stop_job(submission_id)
    status = wait_for_end(cluster, submission_id, wait_s)
    echo(f"{submission_id}: {status}")
    return status


def list_jobs(cluster: Cluster, show_all: bool = False) -> list[dict[str, Any]]:
    """This tool's jobs on the cluster (every job with `show_all`), newest first, as table rows."""
    try:
        jobs = cluster.client.list_jobs()
    except Exception as error:
        raise ClusterError(f"cluster {cluster.url}: {first_line(error)}") from None
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        metadata = job.metadata or {}
        if not show_all and "orchestrator" not in metadata:
            continue
        rows.append({
            "id": job.submission_id or job.job_id, "status": str(job.status.value), "kind": metadata.get("kind", "-"),
            "job": metadata.get("job", "-"), "started": _when(job.start_time), "took": _took(job.start_time, job.end_time),
            "results": metadata.get("results", "-"),
        })
    return rows


def describe(cluster: Cluster, submission_id: str) -> dict[str, Any]:
    info = job_info(cluster, submission_id)
    metadata = info.metadata or {}
    return {
        "id": submission_id, "status": str(info.status.value), "message": info.message or "",
        "kind": metadata.get("kind", "-"), "job": metadata.get("job", "-"), "results": metadata.get("results", "-"),
        "entrypoint": info.entrypoint, "started": _when(info.start_time), "took": _took(info.start_time, info.end_time),
        "dashboard": cluster.job_link(submission_id),
    }


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _took(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = ((end_ms or time.time() * 1000) - start_ms) / 1000
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
