"""A warm local runtime: `orchestrator up` keeps a Ray instance and the embedded store running in the background,
`orchestrator run --local` joins them instead of starting its own, `orchestrator down` (or an idle timeout) stops them.

The runtime is a detached process (`python -m orchestrator.launch.warm`) that starts Ray and the store, records
them in <ORCHESTRATOR_HOME>/warm-runtime.json (0600) and watches for jobs. Ray is started from a scrubbed
environment: nothing of the shell that ran `up` (AWS credentials, ORCHESTRATOR_* settings) reaches its
processes. Each run joins as a Ray job of its own, and its workers get what they would have inherited from a Ray
started by the run itself, through the job's runtime_env: the run's environment where it differs from Ray's
(the store's credentials among it). Ray gives every job worker processes of its own, and the one actor Ray
Train shares between runs is started by the runtime, so nothing of one run is seen by the next.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.builtin import cache_home
from orchestrator.errors import OrchestratorError, first_line
from orchestrator.process_state import RecordedProcess, is_running, kill_all, read_json, recorded, write_private_json
from orchestrator.spec import JobSpec
from orchestrator.storage.objectstore import EmbeddedObjectStore, exported_env, local_store_dir

# What of the environment of `up` the runtime's Ray keeps: what finds programs, libraries, the user's home (Ray's
# auth token is there) and the machine's devices, and Ray's own settings. Nothing that names credentials.
_KEPT_VARIABLES = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
                   "VIRTUAL_ENV", "PYTHONPATH", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_VISIBLE_DEVICES"}
_KEPT_PREFIXES = ("LC_", "RAY_")
_POLL_S = 2.0  # how often the runtime looks for jobs and for parts that died


@dataclass
class WarmRuntime:
    """What `up` recorded: where Ray and the store are, and every process of theirs (pid, start time)."""

    daemon: RecordedProcess  # the process that owns Ray and the store; they die with it
    gcs_address: str
    dashboard_url: str
    session_dir: str
    store_dir: str
    store_endpoint: str
    cpus: int
    idle_timeout_min: float
    processes: dict[str, RecordedProcess]  # Ray's own (gcs_server, raylet, dashboard, …) and the store's (weed)
    ray_env: dict[str, str]  # the environment Ray's processes started with (what a run's workers get without it)

    def __post_init__(self) -> None:  # read back from JSON, a recorded process is a list
        self.daemon = tuple(self.daemon)
        self.processes = {name: tuple(process) for name, process in self.processes.items()}

    @property
    def every_process(self) -> list[RecordedProcess]:
        return [self.daemon, *self.processes.values()]

    @classmethod
    def read(cls, path: Path | None = None) -> "WarmRuntime | None":
        data = read_json(path or state_path())
        try:
            return cls(**data) if data else None
        except TypeError:  # written by another version
            return None

    def summary(self) -> str:
        return (f"Ray at {self.gcs_address} ({self.cpus} CPUs, dashboard {self.dashboard_url}), object store at "
                f"{self.store_endpoint} (data in {self.store_dir}), pid {self.daemon[0]}")

    def dead_part(self) -> str | None:
        """What of the runtime no longer runs or answers; None when all of it does."""
        for name, process in {"runtime process": self.daemon, **self.processes}.items():
            if not is_running(process):
                return f"its {name} (pid {process[0]}) has exited"
        host, port = self.gcs_address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return f"its Ray head does not answer at {self.gcs_address}"
        if EmbeddedObjectStore.shared(self.store_dir) is None:
            return f"its object store does not answer at {self.store_endpoint}"
        return None

    def clear(self) -> None:
        """Kill whatever of a dead (or stopping) runtime still runs, and forget it."""
        kill_all(self.every_process)
        current = WarmRuntime.read()
        if current is not None and current.daemon == self.daemon:  # not a runtime started since
            state_path().unlink(missing_ok=True)


def state_path() -> Path:
    return cache_home() / "warm-runtime.json"


def log_path() -> Path:
    return cache_home() / "warm-runtime.log"


def ray_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment the runtime's Ray starts with: `environ` without credentials or settings of the shell."""
    return {name: value for name, value in environ.items()
            if (name in _KEPT_VARIABLES or name.startswith(_KEPT_PREFIXES)) and name != "RAY_ADDRESS"}


def up(idle_timeout_min: float = 30.0, cpus: int | None = None, echo=print) -> WarmRuntime:
    """Start the warm runtime in the background (or say that it runs); it stops after `idle_timeout_min`
    minutes without a Ray job, or with down()."""
    if idle_timeout_min <= 0:
        raise OrchestratorError(f"--idle-timeout: must be more than 0 minutes (got {idle_timeout_min:g})")
    if cpus is not None and cpus < 1:
        raise OrchestratorError(f"--cpus: must be at least 1 (got {cpus})")
    runtime = WarmRuntime.read()
    if runtime is not None:
        dead = runtime.dead_part()
        if dead is None:
            echo(f"warm runtime already running: {runtime.summary()}; `orchestrator down` stops it")
            return runtime
        echo(f"the recorded warm runtime is dead ({dead}); replacing it")
        runtime.clear()
    runtime = _start_daemon(idle_timeout_min, cpus or os.cpu_count() or 1)
    echo(f"warm runtime up: {runtime.summary()}; it stops after {idle_timeout_min:g} min without a run, "
         f"or with `orchestrator down`")
    return runtime


def _start_daemon(idle_timeout_min: float, cpus: int, timeout_s: float = 180.0) -> WarmRuntime:
    store_dir = local_store_dir()
    if EmbeddedObjectStore.shared(store_dir) is not None:
        raise OrchestratorError(f"store {store_dir}: already kept running by another warm runtime (another ORCHESTRATOR_HOME)")
    log = log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", __name__, "--state", str(state_path()), "--store-dir", str(store_dir),
               "--cpus", str(cpus), "--idle-timeout-min", str(idle_timeout_min)]
    with open(log, "ab") as output:
        # Its own session: the terminal's Ctrl-C and hang-up, meant for the shell's commands, do not reach it.
        daemon = subprocess.Popen(command, env=ray_environment(dict(os.environ)), stdin=subprocess.DEVNULL,
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runtime = WarmRuntime.read()
        if runtime is not None and runtime.daemon[0] == daemon.pid:
            return runtime
        if daemon.poll() is not None:
            raise OrchestratorError(f"warm runtime: exited at start ({_last_line(log)}; log: {log})")
        time.sleep(0.1)
    daemon.kill()
    raise OrchestratorError(f"warm runtime: not ready within {timeout_s:.0f} s (log: {log})")


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def down(echo=print) -> bool:
    """Stop the warm runtime (Ray and the store; the store's data stays); False when none was recorded."""
    runtime = WarmRuntime.read()
    if runtime is None:
        echo("no warm runtime is running")
        return False
    if is_running(runtime.daemon):
        kill_all([runtime.daemon], signal.SIGTERM, wait_s=30)  # it stops Ray and the store, then exits
        echo(f"warm runtime stopped (data kept in {runtime.store_dir})")
    else:
        echo("the recorded warm runtime had already exited; its record is removed")
    runtime.clear()
    return True


def warm_runtime_for(spec: JobSpec, echo) -> WarmRuntime | None:
    """The running warm runtime, if this local run can use it; each reason it cannot is said in one line."""
    runtime = WarmRuntime.read()
    if runtime is None:
        return None
    dead = runtime.dead_part()
    if dead is not None:
        # What still runs of it would hold CPUs, and the store's data directory (a new store there would fail).
        kill_all(runtime.every_process)
        echo(f"warm runtime: dead ({dead}); starting a runtime for this run (`orchestrator up` replaces it)")
        return None
    reason = why_not_usable(runtime, spec, local_store_dir())
    if reason is not None:
        echo(f"warm runtime: {reason}; starting a runtime for this run")
        return None
    echo(f"warm runtime: joining Ray at {runtime.gcs_address} ({runtime.cpus} CPUs), started by `orchestrator up`")
    return runtime


def why_not_usable(runtime: WarmRuntime, spec: JobSpec, store_dir: Path) -> str | None:
    """Why a healthy warm runtime cannot take this run (`store_dir`: the run's local store), or None."""
    needed = math.ceil(spec.scaling.num_workers * spec.scaling.cpus_per_worker)
    if needed > runtime.cpus:
        return f"the job needs {needed} CPUs, it has {runtime.cpus}"
    if spec.storage.uri is None and Path(runtime.store_dir) != store_dir:
        return f"it serves the store in {runtime.store_dir}, this run's is {store_dir}"
    return None


def connect(runtime: WarmRuntime) -> None:
    """Join the warm runtime's Ray as a new job whose workers get this process's environment where it differs
    from Ray's own: what they would have inherited from a Ray started here."""
    import ray
    from ray._raylet import Config

    env_vars = {name: value for name, value in os.environ.items() if runtime.ray_env.get(name) != value}
    # Ray turns token authentication on for a Ray it starts (the token in ~/.ray/auth_token) but never for an
    # address it is given: the mode it started with comes from its environment. Ray reads its settings from the
    # environment once, at import; Config.initialize reads them again (as ray.init does when it turns auth on).
    auth = {name: runtime.ray_env[name] for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if name in runtime.ray_env}
    with exported_env(auth):
        Config.initialize("")
        try:
            ray.init(address=runtime.gcs_address, logging_level="WARNING", log_to_driver=False,
                     runtime_env={"env_vars": env_vars})
        except (ConnectionError, RuntimeError) as error:  # stopped since it was checked, or another Ray version
            raise OrchestratorError(f"warm runtime: cannot join Ray at {runtime.gcs_address} ({first_line(error)}); "
                                    f"run again (`orchestrator down` forgets it)") from None


def serve(state: Path, store_dir: Path, cpus: int, idle_timeout_min: float) -> None:
    """The runtime process: start Ray and the store, record them, and keep them until asked to stop (SIGTERM),
    until idle for `idle_timeout_min`, or until a part of them dies."""
    import ray

    from orchestrator.launch.runtime import API_SERVER_VARIABLE, start_local_ray

    def stop_asked(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_asked)
    store = EmbeddedObjectStore(store_dir)
    store.launch()  # comes up while Ray starts
    try:
        ray_env = start_local_ray(num_cpus=cpus, log_to_driver=False)
        _start_shared_train_actor()
        store.wait_until_serving()
        store.share()
        node = ray._private.worker._global_node  # where Ray's processes are has no public API
        processes = {name: recorded(infos[0].process.pid) for name, infos in node.all_processes.items() if infos}
        runtime = WarmRuntime(
            daemon=recorded(os.getpid()), gcs_address=node.gcs_address, dashboard_url=ray_env[API_SERVER_VARIABLE],
            session_dir=node.get_session_dir_path(), store_dir=str(store_dir), store_endpoint=store.endpoint_url,
            cpus=cpus, idle_timeout_min=idle_timeout_min, processes={**processes, "object store": recorded(store.pid)},
            ray_env=ray_env)
        write_private_json(state, asdict(runtime))
        _log(f"ready: {runtime.summary()}")
        _wait_while_used(runtime, store, state, ray.get_runtime_context().get_job_id())
    except KeyboardInterrupt:
        _log("asked to stop")
    finally:
        recorded_now = WarmRuntime.read(state)
        if recorded_now is not None and recorded_now.daemon[0] == os.getpid():
            state.unlink(missing_ok=True)
        ray.shutdown()
        store.stop()


def _start_shared_train_actor() -> None:
    """Start the one actor Ray Train shares between runs (the AutoscalingCoordinator: detached, named, made by the
    first controller that asks for it, then reused by all). Made by a run, it would keep that run's environment
    (its runtime_env: credentials) for the runtime's life, serving every later run; made here, it has Ray's
    scrubbed environment, and it is up before the first run asks (one worker process fewer on each run's start)."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # a Ray without it: nothing is shared
        return
    ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote())


def _wait_while_used(runtime: WarmRuntime, store: EmbeddedObjectStore, state: Path, own_job: str) -> None:
    """Return once no job but this process's own has run for the idle timeout, once a part has died, or once the
    record is gone (its home deleted, say): then no command could find the runtime, or stop it."""
    from ray._private.state import jobs

    used_at = time.monotonic()
    while True:
        time.sleep(_POLL_S)
        dead = next((name for name, process in runtime.processes.items() if not is_running(process)), None)
        if dead is not None or not store.running():
            _log(f"stopping: {dead or 'object store'} exited")
            return
        if WarmRuntime.read(state) != runtime:
            _log(f"stopping: {state} no longer records this runtime")
            return
        if any(not job["IsDead"] and job["JobID"] != own_job for job in jobs()):
            used_at = time.monotonic()
        elif time.monotonic() - used_at >= runtime.idle_timeout_min * 60:
            _log(f"stopping: no job for {runtime.idle_timeout_min:g} min")
            return


def _log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warm runtime: {line}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description="the warm runtime's process (see `orchestrator up`)")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--store-dir", type=Path, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    parser.add_argument("--idle-timeout-min", type=float, required=True)
    args = parser.parse_args(argv)
    serve(args.state, args.store_dir, args.cpus, args.idle_timeout_min)


if __name__ == "__main__":
    main()
