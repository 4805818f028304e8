"""Run by tests/test_multinode.py in its own process: a Ray cluster of several nodes on this machine
(ray.cluster_utils.Cluster: a head with no CPUs, three 1-CPU worker nodes, each with its own cache and temp
directories, so that nothing node-local is shared), one elastic run on it, and a node that gets a spot notice and
is then removed.
Prints one JSON line: the run's summary, its console lines and what was removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

import orchestrator
from orchestrator.spec import validate_spec


def preempt_a_worker_node(cluster: Cluster, nodes: list, marker: Path, spec, removed: dict) -> None:
    """At rank 0's first pause: give a node that hosts a worker a spot notice (`ray drain-node`, reason preemption,
    as a cloud's autoscaler does), wait for the checkpoint the group takes when Ray Train sees it, then take the node
    away."""
    from ray.util.state import list_actors

    from orchestrator.storage.fs import open_storage
    from orchestrator.storage.layout import RunLayout

    while not marker.exists():
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    hosting = {worker.node_id for worker in workers}
    victim = next(node for node in nodes if node.node_id in hosting)
    paused_at = json.loads(marker.read_text())["step"]
    subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address, "--node-id", victim.node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                    "--deadline-remaining-seconds", "120"], check=True, capture_output=True)
    storage = open_storage(spec.storage.uri, spec.storage.endpoint_url)
    layout = RunLayout(storage, spec.name, "elastic")
    deadline = time.monotonic() + 120
    while not any(step > paused_at for step in layout.complete_checkpoints()):
        assert time.monotonic() < deadline, "no checkpoint after the preemption notice"
        time.sleep(0.2)
    removed.update(node_id=victim.node_id, workers_before=len(workers), drained_after_step=paused_at,
                   checkpoints_at_removal=sorted(layout.complete_checkpoints()))
    cluster.remove_node(victim)  # the spot instance is gone: its raylet and workers with it


def main() -> None:
    spec, root, marker = validate_spec(json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray Train's watcher of drains (default 5 s)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = []
    for index in range(3):
        home = root / f"node-{index}"
        env = {"ORCHESTRATOR_HOME": str(home / "orchestrator"), "HF_DATASETS_CACHE": str(home / "datasets"),
               "TMPDIR": str(home / "tmp")}
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        nodes.append(cluster.add_node(num_cpus=1, env_vars=env))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    removed: dict = {}
    threading.Thread(target=preempt_a_worker_node, args=(cluster, nodes, marker, spec, removed), daemon=True).start()
    lines: list[str] = []

    def echo(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    result = orchestrator.run(spec, local=False, run_id="elastic", echo=echo)
    nodes_built = sorted(str(p.relative_to(root)) for p in root.glob("node-*/orchestrator/models/*"))
    print("RESULT " + json.dumps({"summary": result.summary, "lines": lines, "removed": removed, "built": nodes_built}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
