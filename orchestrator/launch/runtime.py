"""The Ray runtime and the object store a run needs: reuse what is there, start what is missing."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

from orchestrator.errors import OrchestratorError, first_line
from orchestrator.launch.warm import connect, warm_runtime_for
from orchestrator.spec import JobSpec
from orchestrator.storage.objectstore import DEFAULT_BUCKET, DEFAULT_STORAGE, embedded_store, exported_env, free_ports


@contextmanager
def storage_and_ray(spec: JobSpec, local: bool, echo, idle_driver_slots: int = 0) -> Iterator[str]:
    """The storage URI with Ray running. In local mode without storage.uri, the embedded store comes up
    while Ray starts (saving ~2 s of a local run's start on 2 cores); its credentials are exported
    before Ray so that its workers inherit them. It is asked to stop after Ray: asked while Ray's
    workers still held connections to it, it took 15 s instead of 2 to exit. The command does not wait
    for it to finish (see EmbeddedObjectStore.stop). A running warm runtime (`orchestrator up`) that can
    hold the job is used instead of both (launch/warm.py)."""
    import ray

    warm = warm_runtime_for(spec, echo) if local and not ray.is_initialized() else None
    if spec.storage.uri is not None or not local or ray.is_initialized() or warm is not None:
        with storage_for(spec, local, echo) as storage_uri, ray_runtime(spec, local, idle_driver_slots,
                                                                        trim_train_helpers=local, warm=warm):
            yield storage_uri
        return
    with embedded_store(echo, alongside=ray_runtime(spec, local, idle_driver_slots, trim_train_helpers=True)):
        yield DEFAULT_STORAGE


@contextmanager
def storage_for(spec: JobSpec, local: bool, echo) -> Iterator[str]:
    """Yield the storage URI: the spec's, or an embedded S3 server's in local mode."""
    if spec.storage.uri is not None:
        yield spec.storage.uri
        return
    if not local:
        raise OrchestratorError("storage.uri: required outside local mode (an s3:// bucket the cluster can reach)")
    import ray

    if ray.is_initialized():
        raise OrchestratorError("storage.uri: Ray is already running, so the embedded store's credentials cannot reach its workers; set storage.uri")
    with embedded_store(echo):  # its credentials are inherited by the Ray workers started inside
        yield DEFAULT_STORAGE


def serve_store(data_dir: str | None = None, echo=print) -> None:
    """Serve the embedded store in the foreground until interrupted, e.g. for a head from cluster/local.sh.

    Its credentials are printed as export lines: they are this store's own, new at every start, and
    the shell that submits jobs needs them."""
    import time

    # Quiet: stdout is only comments and export lines, for `source`. Waits for the stop, as a foreground server.
    with embedded_store(None, data_dir=data_dir, wait_for_stop=True) as store:
        echo(f"# embedded S3 store at {store.endpoint_url}, bucket {DEFAULT_BUCKET}, data in {store.data_dir}; Ctrl-C stops it")
        for name, value in store.env().items():
            echo(f"export {name}={value}")
        while store.running():
            time.sleep(1)
        raise OrchestratorError(f"embedded object store exited (log: {store.data_dir / 'weed.log'})")


def with_local_cpu_share(spec: JobSpec) -> JobSpec:
    """Local mode: a worker whose CPUs the spec leaves out gets an equal share of the local Ray's.

    Ray sets a worker's torch threads (OMP_NUM_THREADS) from its CPUs, so one worker at the default 1
    would leave the rest of the machine idle (measured: 0.61x a plain loop's tokens/s on 2 cores)."""
    import ray

    if "cpus_per_worker" in spec.scaling.model_fields_set:
        return spec
    share = float(max(1, int(ray.cluster_resources().get("CPU", 1)) // spec.scaling.num_workers))
    return spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"cpus_per_worker": share})})


def require_resources(spec: JobSpec) -> None:
    """Refuse a job the running Ray cluster can never hold (more GPUs than it has, or a worker larger than any node)."""
    import ray

    from orchestrator.plan import cluster_needs, worker_resources

    total = ray.cluster_resources()
    fewest = spec.scaling.worker_range[0]  # an elastic run starts on min_workers
    lacking = [f"{name} {amount:g} (it has {total.get(name, 0):g})" for name, amount in cluster_needs(spec, fewest).items()
               if total.get(name, 0) + 1e-9 < amount]
    if lacking:
        hint = "; this machine has no GPU: set scaling.use_gpu: false" if spec.scaling.use_gpu and not total.get("GPU") else ""
        raise OrchestratorError(f"scaling: the job needs {', '.join(lacking)} but the Ray cluster holds less{hint}")
    per_worker = worker_resources(spec)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if nodes and not any(all(node.get(k, 0) + 1e-9 >= v for k, v in per_worker.items()) for node in nodes):
        raise OrchestratorError(f"scaling: no node of the Ray cluster can hold one worker ({per_worker})")


# A local run owns a one-machine Ray: no node can be preempted and nothing scrapes Train's or Ray's
# metrics, so those helpers only take CPU from the workers (Ray's metrics: every process of Ray records
# and exports them, the local run's own Ray reads the variable at start); and a controller polling its
# workers every 0.5 s instead of 2 notices the end of training sooner (each poll is one small call per
# worker). A variable already set wins. Measured: a 4-step run on the tests' shared Ray took 26-33 s with these
# against 35-50 s without (2 cores); a search's trials are such runs.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_enable_metrics_collection": "0"}


@contextmanager
def ray_runtime(spec: JobSpec, local: bool, idle_driver_slots: int = 0, trim_train_helpers: bool = False,
                warm=None) -> Iterator[None]:
    """Use a running Ray; else join the `warm` runtime, start one in-process (local) or connect to RAY_ADDRESS.

    `idle_driver_slots`: extra CPUs declared in local mode for processes that mostly wait (Tune counts 0.01 CPU
    per trial driver when it sizes a search, which would otherwise leave the last worker CPU unusable).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    trimmed = {k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ} if local and trim_train_helpers else {}
    with exported_env(trimmed):  # the driver's Train code and the controller read them while this Ray lives
        if warm is not None:
            connect(warm)  # as below, without the workers' output
        elif local:
            cpus_needed = math.ceil(spec.scaling.num_workers * spec.scaling.cpus_per_worker)
            # The workers' output (Ray Train prints every failed rank's traceback) stays in Ray's session
            # logs: the console gets progress through a queue and a failure as three lines (launch/failures.py).
            start_local_ray(num_cpus=max(os.cpu_count() or 1, cpus_needed) + idle_driver_slots, log_to_driver=False)
        else:
            address = os.environ.get("RAY_ADDRESS", "auto")
            try:
                ray.init(address=address, logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise OrchestratorError(
                    f"cannot connect to a Ray cluster at RAY_ADDRESS={address!r} ({first_line(error)}); use --local for "
                    f"single-node mode, or `orchestrator submit` to send the job to a cluster"
                ) from None
        if local:
            # So do the errors the raylet pushes to the driver (a dead worker, in one long line): they are in
            # the session's events/event_RAYLET.log. Ray's flag for this is the one its debugger uses.
            ray._private.worker._worker_logs_enabled = False
        try:
            yield
        finally:
            ray.shutdown()
            ray._private.worker._worker_logs_enabled = True


API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"  # read before RAY_ADDRESS by Ray's state-API clients
# A custom resource of 1 on every Ray this project starts: a search's trial drivers each take 1/n of it, so that
# no more than n drivers live at once (launch/tune.py). Ray's own resources cannot say that: a driver needs
# almost no CPU, and its workers are placed by Train, outside the trial's own resources.
TRIAL_SLOTS = "orchestrator_trial_slots"


def start_local_ray(**init_options) -> dict[str, str]:
    """Start a one-machine Ray whose own processes find its state API even beside another Ray instance;
    returns the environment its processes started with.

    Train V2's PlacementGroupCleaner asks the state API (served by the dashboard) whether the controller
    still lives. With no address given, Ray looks for "the" local instance and raises when it finds two
    (a cluster/local.sh head, another run): the cleaner's thread dies, and the placement group of every
    Tune trial stopped at max_t or by the scheduler is never freed, so the next trials wait for CPUs
    forever. Ray's processes inherit the driver's environment at start, so the dashboard address is
    set only around ray.init: nothing else this process starts later is pointed at this instance.
    """
    import ray

    dashboard_port = free_ports(1)[0]
    with exported_env({API_SERVER_VARIABLE: f"http://127.0.0.1:{dashboard_port}"}):
        # address="local": always a new instance. Without an address Ray joins a `ray start` head on this
        # machine (or follows the ray_current_cluster file a dead one left) and then refuses num_cpus.
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                 logging_level="WARNING", resources={TRIAL_SLOTS: 1.0}, **init_options)
        return dict(os.environ)  # with what ray.init itself sets before starting them (RAY_AUTH_MODE)
