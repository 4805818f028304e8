"""A worker's failure on the console: its root cause, the rank and host, and where the full log is.

Ray Train raises a WorkerGroupError whose text is every failed rank's traceback; the tracebacks stay in
the logs (local runs keep the workers' output out of the console, see launch/runtime.py). What the
console needs comes from two places: the error's `worker_failures` (rank → exception), and `WorkerWatch`,
a callback in Ray Train's controller that tells the driver where each rank runs and when a failed
worker group is restarted, through the progress queue.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
from typing import Any, Optional

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.controller.state import RestartingState

# Errors a rank reports because another rank failed first: never the root cause when there is another.
_COLLATERAL = re.compile(r"gloo|nccl|connection (closed|reset)|broken pipe|ProcessGroup|collective|timed out", re.IGNORECASE)
_EXIT_DETAIL = re.compile(r"Worker exit detail: (.*?)(?: Some common causes include| There are some potential root causes|$)",
                          re.DOTALL)


class WorkerWatch(WorkerGroupCallback, ControllerCallback):
    """Runs in Ray Train's controller: sends `workers` (rank → host, pid) at each start of the worker
    group and `restarting` (the failures, with their hosts) when a failed group is restarted. Events
    are sent without waiting (the controller's loop must not block on the driver), and a callback that
    raised would itself count as a training failure, so nothing here may raise."""

    def __init__(self, progress_queue):
        self.queue = progress_queue
        self.places: dict[int, dict[str, Any]] = {}

    def after_worker_group_start(self, worker_group) -> None:
        try:
            self.places = {worker.distributed_context.world_rank: {"host": worker.metadata.hostname, "pid": worker.metadata.pid}
                           for worker in worker_group.get_workers()}
            self._send({"event": "workers", "places": self.places})
        except Exception:
            pass

    def after_controller_state_update(self, previous_state, current_state) -> None:
        try:
            if isinstance(current_state, RestartingState):
                failures = getattr(current_state.training_failed_error, "worker_failures", {})
                rank, error = primary_failure(failures)
                self._send({"event": "restarting", "rank": rank, **self.places.get(rank, {}), "cause": root_cause(error)})
        except Exception:
            pass

    def _send(self, event: dict) -> None:
        self.queue.actor.put_nowait.remote(event)


def primary_failure(failures: dict[int, BaseException]) -> tuple[int, BaseException]:
    """The failure to show: the lowest rank whose error is not a consequence of another rank's."""
    return min(failures.items(), key=lambda item: (bool(_COLLATERAL.search(str(item[1]))), item[0]))


def root_cause(error: BaseException) -> str:
    """One line: a dead worker process's exit detail, else the exception's type and first line."""
    detail = _exit_detail(error)
    if detail is not None:
        return _cap(f"worker process died: {detail}")
    lines = str(error).strip().splitlines()
    return _cap(f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)


def _exit_detail(error: BaseException) -> Optional[str]:
    """Why Ray says a worker process ended, when `error` is its death (Ray's health check found it gone)."""
    died = getattr(error, "health_check_failure", error)
    found = _EXIT_DETAIL.search(str(died)) if type(died).__name__ in ("ActorDiedError", "RayActorError") else None
    if found is None:
        return None
    text = " ".join(found.group(1).split())
    if "OOM killer" in str(died) and "memory" not in text:  # Ray cannot tell a kernel OOM kill from other signals
        text += " (killed by the kernel's OOM killer or another signal, or crashed: dmesg on its host tells)"
    return text


def _cap(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure_lines(error: BaseException, events: list[dict], run_uri: str, checkpoint: Optional[int]) -> str:
    """The console's three lines about a run whose training failed for good."""
    kept = f"last complete checkpoint: step {checkpoint}" if checkpoint else "no complete checkpoint yet"
    failures = getattr(error, "worker_failures", None)
    if not failures:  # Ray Train's controller failed (e.g. the workers could not be started)
        return (f"training failed: {root_cause(getattr(error, 'controller_failure', error))}\n"
                f"  run {run_uri} ({kept})\n  full log: {log_location(None, None)}")
    rank, primary = primary_failure(failures)
    place = next((e["places"] for e in reversed(events) if e.get("event") == "workers"), {}).get(rank, {})
    host = place.get("host", "an unknown host")
    others = sorted(set(failures) - {rank})
    also = f"; rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too" if others else ""
    return (f"training failed: {root_cause(primary)}\n"
            f"  on worker rank {rank}, host {host}" + (f" (pid {place['pid']})" if "pid" in place else "")
            + f"{also}; run {run_uri} ({kept})\n"
            f"  full log: {log_location(host, place.get('pid'), died=_exit_detail(primary) is not None)}")


def trial_failure(trial) -> str:
    """A failed search trial in one line: its root cause and rank, from the error Tune pickled beside the
    trial's error.txt (the full text, named here)."""
    import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as pickled:
            error = cloudpickle.load(pickled)
    except Exception:  # no pickled error (Tune writes one for task and actor errors only)
        return f"full error: {trial.error_file}"
    error = getattr(error, "cause", None) or error  # Ray's task error → what the trial raised
    failures = getattr(error, "worker_failures", None)
    rank, error = primary_failure(failures) if failures else (None, error)
    return root_cause(error) + (f" (worker rank {rank})" if rank is not None else "") + f"; full error: {trial.error_file}"


def log_location(host: Optional[str], pid: Optional[int], died: bool = False) -> str:
    """Where the failed worker's whole output is: in a submitted job, the job's logs (Ray forwards the
    workers' output there); else its log file when it ran on this machine (for a process that died, with
    Ray's note on why), else Ray's session logs on its host."""
    logs = session_logs()
    found = sorted(glob.glob(os.path.join(logs, f"worker-*-{pid}.err"))) if host == socket.gethostname() and pid else []
    submission = _submission_id()
    if submission:
        return f"the job's logs: orchestrator logs {submission} (the worker's own: {found[-1] if found else logs} on {host})"
    if found and died:
        return f"{logs} (events/event_RAYLET.log says why it ended; {os.path.basename(found[-1])} holds its output)"
    if found:
        return found[-1]
    return logs + (f" on {host}" if host and host != socket.gethostname() else "")


def session_logs() -> str:
    """This Ray session's log directory on this machine (other nodes keep theirs under the same session name)."""
    import ray

    node = ray._private.worker._global_node  # the session's directory has no public API
    return os.path.join(node.get_session_dir_path(), "logs") if node else "Ray's session logs (/tmp/ray/session_latest/logs)"


def _submission_id() -> Optional[str]:
    """The Ray job's submission id when this driver runs as one (Ray's job supervisor passes it in)."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, ValueError, TypeError):
        return None
