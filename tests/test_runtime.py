"""The one-machine Ray that local mode starts, beside another Ray instance on the same machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

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
def test_local_ray_starts_its_own_instance_beside_another_ray_and_a_stale_address_file(ray_session):
    # Two other Rays at once: the test session's (ray_session), whose workers must not be confused with
    # ours, and a dead `ray start` head whose ray_current_cluster file is still there. Without
    # address="local", ray.init follows that file and raises "When connecting to an existing cluster,
    # num_cpus and num_gpus must not be provided".
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live below it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    env["RAY_TMPDIR"] = str(ray_tmp)
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ray_tmp, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "nodes 1" in probe.stdout
