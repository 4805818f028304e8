"""Jobs already submitted to a running cluster, by submission id: list, status, logs, stop.

The public functions behind `orchestrator list | status | logs | stop`. `address` is the cluster's
dashboard (http://HEAD:8265); None means RAY_ADDRESS. A job that does not exist, or a cluster that
cannot be reached, is one `ClusterError` line.
"""

from __future__ import annotations

from typing import Any, Callable

from orchestrator.launch import submit as _submitted
from orchestrator.launch.cluster_client import connect

EXIT_CODES = _submitted.EXIT_CODES  # a job's final status → the exit code of `logs --follow` / `submit --follow`


def list_jobs(address: str | None = None, show_all: bool = False) -> list[dict[str, Any]]:
    """This tool's jobs on the cluster (every job with `show_all`), newest first: one dict per job with
    id, status, kind (run | tune), job, started, took and results (the storage URI)."""
    return _submitted.list_jobs(connect(address), show_all=show_all)


def status(submission_id: str, address: str | None = None) -> dict[str, Any]:
    """One job: id, status, message, kind, job, results, entrypoint, started, took and its dashboard link."""
    return _submitted.describe(connect(address), submission_id)


def logs(submission_id: str, address: str | None = None, follow: bool = False,
         echo: Callable[[str], None] = print) -> str:
    """Pass the job's logs to `echo` (with `follow`, streamed until the job ends); returns its status then."""
    cluster = connect(address)
    if follow:
        return _submitted.follow_logs(cluster, submission_id, echo=echo)
    info = _submitted.job_info(cluster, submission_id)
    text = cluster.client.get_job_logs(submission_id)
    if text:
        echo(text.rstrip("\n"))
    return str(info.status.value)


def stop(submission_id: str, address: str | None = None, echo: Callable[[str], None] = print) -> str:
    """Ask the job to stop (it unwinds and keeps its last complete checkpoint), wait for it; returns its status."""
    return _submitted.stop(connect(address), submission_id, echo=echo)
