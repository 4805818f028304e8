"""Where Ray places a job's workers on a multi-node cluster with fake GPU nodes (no GPU needed).

Builds a local Ray cluster with `ray.cluster_utils.Cluster`: a CPU-only head and two nodes that
each declare 8 CPUs, 4 GPUs and the A100 accelerator marker. For a 4-worker job (1 GPU each) it
asks Ray for the placement group that Ray Train's ScalingConfig describes, under each placement
strategy, and prints the node each worker's bundle lands on.

    python bench/placement.py [--workers 4] [--json]
"""

from __future__ import annotations

import argparse
import json

import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from orchestrator.launch.run import scaling_config
from orchestrator.spec import validate_spec

GPU_NODE = {"num_cpus": 8, "num_gpus": 4, "resources": {"accelerator_type:A100": 1}}


def spec_for(workers: int, strategy: str):
    return validate_spec({
        "name": "placement", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"},
        "scaling": {"num_workers": workers, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 2,
                    "accelerator_type": "A100", "placement_strategy": strategy},
        "storage": {"uri": "s3://bucket/placement"},
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_nodes = [cluster.add_node(**GPU_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    names = {node.node_id: f"gpu-node-{i}" for i, node in enumerate(gpu_nodes)}
    names[cluster.head_node.node_id] = "head"
    outcome = {}
    try:
        for strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            config = scaling_config(spec_for(args.workers, strategy))
            bundles = config.as_placement_group_factory().bundles
            group = placement_group(bundles, strategy=strategy)
            placed = group.wait(timeout_seconds=10)
            nodes = [names.get(n, n) for n in placement_group_table(group)["bundles_to_node_id"].values()] if placed else []
            outcome[strategy] = {"bundle": bundles[0], "placed": placed, "nodes": nodes}
            remove_placement_group(group)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if args.json:
        print(json.dumps(outcome))
        return
    print(f"{args.workers} workers × {outcome['PACK']['bundle']} on a CPU head + 2 nodes of 8 CPU / 4 GPU / A100:")
    for strategy, result in outcome.items():
        where = ", ".join(result["nodes"]) if result["placed"] else "cannot be placed (waits for more nodes)"
        print(f"  {strategy:>13}: {where}")


if __name__ == "__main__":
    main()
