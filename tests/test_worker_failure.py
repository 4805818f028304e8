"""A failure inside a worker reaches the console as at most three lines: the root cause, the rank and host
where it happened, and where the full log is; Ray's tracebacks stay in that log. A restart before the
final failure is one line.

Here: the pieces, on the objects Ray Train hands them. End to end, on real runs at no extra cost:
tests/test_secrets.py's local CLI run that fails for good (a Python exception deep in the loop, max_failures
0) checks the console with helpers.assert_worker_failure_is_three_lines; tests/test_methods_matrix.py checks
each restart's event (rank, cause, checkpoint) and tests/test_faults.py the restart line of a killed worker."""

from __future__ import annotations

import json

from orchestrator.launch import failures
from orchestrator.launch.failures import failure_lines, primary_failure, root_cause
from orchestrator.launch.progress import format_event
from orchestrator.train.faults import InjectedFault

# Copied from a real run: what Ray Train reports for a worker process killed with SIGKILL.
KILLED_WORKER_DETAIL = (
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker "
    "unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the process was killed by "
    "the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker crashed unexpectedly due to "
    "SIGSEGV or another unexpected error. If the process was killed by the kernel OOM killer (verifiable by checking for OOM in "
    "dmesg of the OOMing node), consider enabling resource isolation via --enable-resource-isolation to prevent node deaths by "
    "resource contention and significant loss of progress by uninformed kernel OOM killing.")


def killed_worker_error(pid: int):
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = ActorDiedError(ActorDiedErrorContext(class_name="RayTrainWorker", actor_id=b"\1" * 16, pid=pid,
                                                node_ip_address="10.0.0.7", error_message=KILLED_WORKER_DETAIL))
    return WorkerHealthCheckFailedError("Worker health check failed.", died)


def test_the_rank_that_failed_first_is_shown_not_the_ranks_that_lost_it():
    worker_failures = {0: RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.8]:4123"),
                       1: InjectedFault("injected fault after step 3 of run r"), 2: ValueError("a second real error")}
    assert primary_failure(worker_failures)[0] == 1


def test_a_killed_worker_is_named_by_its_exit_detail_not_by_rays_wrapper():
    assert root_cause(killed_worker_error(4242)) == ("worker process died: Worker unexpectedly exits with a connection error "
                                                     "code 2. End of file. (killed by the kernel's OOM killer or another signal, or crashed: dmesg on its host tells)")
    assert root_cause(InjectedFault("injected fault after step 3 of run r\nmore")) == "InjectedFault: injected fault after step 3 of run r"


def test_a_final_failure_is_three_lines_with_cause_rank_host_and_log(monkeypatch):
    from ray.train.v2.api.exceptions import WorkerGroupError

    monkeypatch.setattr(failures, "session_logs", lambda: "/tmp/ray/session_1/logs")

    error = WorkerGroupError("[Rank 0 Error Snippet]: …", {0: RuntimeError("Connection closed by peer [10.0.0.8]:4123"),
                                                           1: killed_worker_error(4242)})
    events = [{"event": "workers", "places": {0: {"host": "node-a", "pid": 11}, 1: {"host": "node-b", "pid": 4242}}}]
    lines = failure_lines(error, events, "s3://b/runs/j/r", checkpoint=4).splitlines()
    assert lines == [
        "training failed: worker process died: Worker unexpectedly exits with a connection error code 2. End of file. "
        "(killed by the kernel's OOM killer or another signal, or crashed: dmesg on its host tells)",
        "  on worker rank 1, host node-b (pid 4242); rank 0 failed too; run s3://b/runs/j/r (last complete checkpoint: step 4)",
        "  full log: /tmp/ray/session_1/logs on node-b",
    ]


def test_a_submitted_job_points_to_its_logs(monkeypatch):
    monkeypatch.setattr(failures, "session_logs", lambda: "/tmp/ray/session_1/logs")
    # What Ray's job supervisor gives the driver of a submitted job.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "it-run-1"}}))
    assert failures.log_location("node-b", 7) == ("the job's logs: orchestrator logs it-run-1 "
                                                  "(the worker's own: /tmp/ray/session_1/logs on node-b)")


def test_a_restart_is_one_line():
    event = {"event": "restarting", "rank": 1, "host": "node-b", "pid": 7, "cause": "InjectedFault: boom", "checkpoint": 4}
    assert format_event(event) == "worker rank 1 on node-b failed: InjectedFault: boom; restarting from checkpoint step 4"
    assert format_event({**event, "checkpoint": None}).endswith("restarting from the start (no complete checkpoint yet)")


def test_the_controller_callback_reports_places_and_a_restart_with_its_host():
    """WorkerWatch in Ray Train's controller, driven with the objects Ray Train gives it."""
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.launch.failures import WorkerWatch

    sent = []
    queue = SimpleNamespace(actor=SimpleNamespace(put_nowait=SimpleNamespace(remote=sent.append)))
    workers = [SimpleNamespace(distributed_context=SimpleNamespace(world_rank=rank), metadata=SimpleNamespace(hostname=host, pid=pid))
               for rank, host, pid in ((0, "node-a", 11), (1, "node-b", 22))]
    watch = WorkerWatch(queue)
    watch.after_worker_group_start(SimpleNamespace(get_workers=lambda: workers))
    failed = WorkerGroupError("…", {1: InjectedFault("injected fault after step 2 of run r")})
    watch.after_controller_state_update(RunningState(), RestartingState(failed))
    assert sent == [{"event": "workers", "places": {0: {"host": "node-a", "pid": 11}, 1: {"host": "node-b", "pid": 22}}},
                    {"event": "restarting", "rank": 1, "host": "node-b", "pid": 22,
                     "cause": "InjectedFault: injected fault after step 2 of run r"}]
