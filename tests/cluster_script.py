"""Run by tests/test_multinode.py in its own process: a Ray cluster of several nodes on this machine
(ray.cluster_utils.Cluster: a head with no CPUs, three 1-CPU worker nodes, each with its own cache and temp
directories, so that nothing node-local is shared), one elastic run on it, and a node removed while the run pauses.
Prints one JSON line: the run's summary, its console lines and what was removed."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

import orchestrator
from orchestrator.spec import validate_spec


def remove_a_worker_node_at_the_pause(cluster: Cluster, nodes: list, marker: Path, removed: dict) -> None:
    from ray.util.state import list_actors

    while not marker.exists():
        time.sleep(0.5)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    hosting = {worker.node_id for worker in workers}
    victim = next(node for node in nodes if node.node_id in hosting)
    removed.update(node_id=victim.node_id, workers_before=len(workers), step=json.loads(marker.read_text())["step"])
    cluster.remove_node(victim)  # what a lost spot instance does: its raylet and workers are gone


def main() -> None:
    spec, root, marker = validate_spec(json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
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
    threading.Thread(target=remove_a_worker_node_at_the_pause, args=(cluster, nodes, marker, removed), daemon=True).start()
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
