"""The warm local runtime (`orchestrator up` / `down`): runs join it, see nothing of each other, and fall back to a
runtime of their own when it is dead; down and the idle timeout leave no process behind.

Every command runs as a subprocess with its own ORCHESTRATOR_HOME, so the warm runtime is a Ray instance of its
own beside the test session's. Runs are 2 steps of one worker on the tiny built-in model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.launch.warm import WarmRuntime, ray_environment, why_not_usable
from orchestrator.process_state import is_running, kill_all, recorded
from orchestrator.storage.fs import open_storage
from orchestrator.storage.objectstore import EmbeddedObjectStore, exported_env
from orchestrator.train.faults import schedule_fault
from tests.helpers import REPO, TEST_BUCKET, make_spec

SMALL_RUN = {"train": {"max_steps": 2, "eval_every": 0, "checkpoint_every": 0, "log_every": 1, "eval_batches": 1},
             "scaling": {"num_workers": 1}}


def test_ray_of_the_warm_runtime_keeps_nothing_of_the_shell_that_started_it():
    shell = {"PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C", "RAY_DEDUP_LOGS": "0", "RAY_ADDRESS": "auto",
             "AWS_ACCESS_KEY_ID": "shell-key", "AWS_SECRET_ACCESS_KEY": "shell-secret", "HF_TOKEN": "hf_x",
             "ORCHESTRATOR_FAULTS": "/tmp/f.json", "MLFLOW_TRACKING_PASSWORD": "p"}
    assert ray_environment(shell) == {"PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C", "RAY_DEDUP_LOGS": "0"}


def test_a_run_the_warm_runtime_cannot_hold_starts_its_own(tmp_path):
    runtime = WarmRuntime(daemon=(1, None), gcs_address="127.0.0.1:1", dashboard_url="", session_dir="",
                          store_dir=str(tmp_path / "store"), store_endpoint="", cpus=2, idle_timeout_min=30,
                          processes={}, ray_env={})
    fits = make_spec(base=make_spec(raw=True, **SMALL_RUN), scaling={"num_workers": 2})
    assert why_not_usable(runtime, fits, tmp_path / "store") is None
    wide = make_spec(base=make_spec(raw=True, **SMALL_RUN), scaling={"num_workers": 3})
    assert why_not_usable(runtime, wide, tmp_path / "store") == "the job needs 3 CPUs, it has 2"
    assert "serves the store in" in why_not_usable(runtime, fits, tmp_path / "other-store")
    elsewhere = make_spec("s3://bucket/prefix", base=make_spec(raw=True, **SMALL_RUN))
    assert why_not_usable(runtime, elsewhere, tmp_path / "other-store") is None


def descendants(pid: int) -> list[tuple[int, int | None]]:
    """Every process below `pid` (Ray's workers and agents below its raylet), recorded by pid and start time."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(recorded(child))
            todo.append(child)
    return found


def environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone meanwhile
        return b""


class Shell:
    """`orchestrator …` commands as a user's shell runs them, all with one ORCHESTRATOR_HOME."""

    def __init__(self, home: Path):
        self.home = home
        # The test session's own credentials and Ray are not the user's.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "ORCHESTRATOR_"))}
        self.env["ORCHESTRATOR_HOME"] = str(home)

    def __call__(self, *args: str, extra_env: dict | None = None, expect: int = 0) -> subprocess.CompletedProcess:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], env={**self.env, **(extra_env or {})},
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = process.communicate(timeout=600)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        result.pid = process.pid
        assert result.returncode == expect, f"{args}: exit {result.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
        return result

    def runtime(self) -> WarmRuntime | None:
        return WarmRuntime.read(self.home / "warm-runtime.json")

    def job_file(self, name: str, **overrides) -> str:
        path = self.home / f"{name}.yaml"
        path.write_text(yaml.safe_dump(make_spec(raw=True, name=name, **SMALL_RUN, **overrides)))
        return str(path)


def processes_and_workers(runtime: WarmRuntime) -> list:
    return [*runtime.every_process, *descendants(runtime.daemon[0])]


def wait_until_gone(processes: list, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_running(p) for p in processes):
        time.sleep(0.2)
    assert not [p for p in processes if is_running(p)], "processes of the warm runtime left running"


def joined_warm_ray(result, runtime: WarmRuntime) -> bool:
    """The run said it joins the runtime's Ray, and its driver is one of that Ray session's drivers."""
    said = f"warm runtime: joining Ray at {runtime.gcs_address}" in result.stdout
    drivers = list(Path(runtime.session_dir, "logs").glob(f"python-core-driver-*_{result.pid}.log"))
    return said and bool(drivers)


def stored_summary(run_output: str) -> dict:
    """The summary of the run whose output this is, read from its storage (credentials from the environment)."""
    run_uri = re.search(r"adapter at (\S+)/adapter$", run_output, re.MULTILINE)[1]
    storage = open_storage(run_uri)
    return json.loads(storage.read_bytes(storage.path("summary.json")))


@pytest.fixture
def shell(tmp_path):
    shell = Shell(tmp_path / "home")
    yield shell
    runtime = shell.runtime()  # a failed test leaves no runtime behind for its idle timeout
    if runtime is not None:
        kill_all(runtime.every_process)


@pytest.mark.slow
def test_runs_join_the_warm_runtime_and_see_nothing_of_each_other(shell, tmp_path, object_store):
    started = shell("up", "--cpus", "2", extra_env={"AWS_ACCESS_KEY_ID": "the-shells-key", "ORCHESTRATOR_FAULTS": "/x"})
    runtime = shell.runtime()
    assert "warm runtime up: Ray at" in started.stdout and runtime is not None
    assert (shell.home / "warm-runtime.json").stat().st_mode & 0o777 == 0o600
    raylet_env = environ(runtime.processes["raylet"][0]).split(b"\0")
    assert not [v for v in raylet_env if v.startswith((b"AWS_", b"ORCHESTRATOR_"))], "the shell's settings reached Ray"
    assert "warm runtime already running" in shell("up").stdout

    # Run A: its own storage and credentials (the session's S3 server), and a variable its workers act on.
    faults = tmp_path / "faults.json"
    schedule_fault(faults, "*", step=1, pause_s=0)
    credentials = {**object_store.env(), "ORCHESTRATOR_FAULTS": str(faults)}
    run_a = shell("run", "--local", shell.job_file("a", storage={"uri": f"s3://{TEST_BUCKET}/warm"}), extra_env=credentials)
    assert joined_warm_ray(run_a, runtime), run_a.stdout
    assert json.loads(Path(f"{faults}.paused").read_text())["step"] == 1, "run A's variable reached its workers"
    with exported_env(object_store.env()):
        assert stored_summary(run_a.stdout)["steps"] == 2

    # Run B: the runtime's store, and nothing of run A's environment.
    schedule_fault(faults, "*", step=1, pause_s=0)
    run_b = shell("run", "--local", shell.job_file("b"))
    assert joined_warm_ray(run_b, runtime), run_b.stdout
    assert "kept running by `orchestrator up`" in run_b.stdout
    assert not Path(f"{faults}.paused").exists(), "run A's ORCHESTRATOR_FAULTS reached run B's workers"
    kept = [pid for pid, _ in descendants(runtime.daemon[0]) if f"ORCHESTRATOR_FAULTS={faults}".encode() in environ(pid)]
    assert not kept, f"processes with run A's environment live on in the runtime: {kept}"
    with exported_env(EmbeddedObjectStore.shared(runtime.store_dir).env()):
        assert stored_summary(run_b.stdout)["steps"] == 2
    assert shell.runtime() == runtime and runtime.dead_part() is None, "the runs left the runtime healthy"

    # Killed: a run says so and starts its own Ray and store (on the same data directory); training there is
    # today's cold path, so the run stops cheaply at the first step after them: --resume finds no run to resume.
    for pid, _ in processes_and_workers(runtime):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # a worker that ended meanwhile
            pass
    run_c = shell("run", "--local", shell.job_file("c"), "--resume", expect=2)
    assert "warm runtime: dead (" in run_c.stdout and "starting a runtime for this run" in run_c.stdout
    assert f"embedded object store: http://127.0.0.1:" in run_c.stdout and "kept running" not in run_c.stdout
    assert "--resume: job c has no run in s3://orchestrator to resume" in run_c.stderr
    replaced = shell("up", "--cpus", "2")
    assert "the recorded warm runtime is dead" in replaced.stdout and "warm runtime up" in replaced.stdout
    runtime = shell.runtime()
    assert runtime.dead_part() is None

    # Down stops every process of it: Ray's, the store's and theirs.
    processes = processes_and_workers(runtime)
    assert "warm runtime stopped" in shell("down").stdout
    wait_until_gone(processes, timeout_s=5)
    assert shell.runtime() is None and "no warm runtime is running" in shell("down").stdout

    # Idle for the timeout (3 s here): it stops by itself.
    shell("up", "--cpus", "2", "--idle-timeout", "0.05")
    processes = processes_and_workers(shell.runtime())
    wait_until_gone(processes)
    assert shell.runtime() is None
