"""The one-machine Ray that local mode starts, beside another Ray instance on the same machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import os
    import ray
    from orchestrator.launch.runtime import API_SERVER_VARIABLE, start_local_ray

    start_local_ray(num_cpus=1)
    assert API_SERVER_VARIABLE not in os.environ, "the address leaked into the driver's environment"

    @ray.remote(num_cpus=0)
    def nodes_seen_by_a_worker():
        # What Train V2's PlacementGroupCleaner does: the state API with no address given.
        from ray.util.state import list_nodes
        return len(list_nodes())

    print("nodes", ray.get(nodes_seen_by_a_worker.remote()))
    ray.shutdown()
""")


@pytest.mark.slow
def test_workers_reach_their_own_state_api_beside_another_ray(ray_session, tmp_path):
    # The test session's Ray (ray_session) is the other instance; without the dashboard address in its
    # workers' environment, Ray raises "Found multiple active Ray instances" in the worker.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "nodes 1" in probe.stdout
