"""A real Ray head on 127.0.0.1 for cluster-mode tests: free ports, token auth, stopped by its own hand.

`ray start --block` stays the parent of every process it starts and stops exactly those when
terminated, so the test never touches another Ray on the machine (as `ray stop` would).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from orchestrator.launch.runtime import LOCAL_RAY_ENV

_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
               "--dashboard-agent-grpc-port", "--metrics-export-port", "--node-manager-port",
               "--object-manager-port", "--runtime-env-agent-port")
# Kept out of the head, so that a job can only reach the store with what its submitter sends.
_CALLER_ONLY = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", *LOCAL_RAY_ENV)  # a cluster keeps Ray's defaults


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RayHead:
    url: str
    token: str
    temp_dir: Path
    process: subprocess.Popen

    def files_containing(self, text: str) -> list[str]:
        """The head's session files (logs and more) that contain `text`, with some context (for secret scans)."""
        found = []
        for path in self.temp_dir.rglob("*"):
            if path.is_file() and not path.is_socket():
                content = path.read_bytes().decode(errors="replace")
                at = content.find(text)
                if at >= 0:
                    found.append(f"{path.relative_to(self.temp_dir)}: …{content[max(0, at - 300):at]}…")
        return found


def start_head(num_cpus: int = 3, timeout_s: float = 120) -> RayHead:
    ports = free_ports(len(_PORT_FLAGS) + 1)
    token = secrets.token_hex(16)
    # A short path: Ray's unix sockets live under it (and their paths are limited to ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="orh-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in _CALLER_ONLY}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               # Every process of this head (and the jobs' `python`) finds this cluster, not another.
               RAY_ADDRESS=f"127.0.0.1:{ports[0]}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
               "--include-dashboard=true"]
    command += [f"{flag}={port}" for flag, port in zip(_PORT_FLAGS, ports)]
    log = open(temp_dir / "ray-start.out", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports[1]}"
    head = RayHead(url, token, temp_dir, process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited {process.returncode}: {(temp_dir / 'ray-start.out').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok:
                return head
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_head(head)
    raise RuntimeError(f"the Ray head did not come up within {timeout_s:g} s")


def stop_group(pgid: int, grace_s: float = 8) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace_s`. A graceful stop of `ray start --block`
    took 20-36 s, which no test checks; killed, the head's processes (and a store in the group) go at once."""
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(1)
            os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_head(head: RayHead) -> None:
    """The head and everything it started (its own process group): a graceful stop took about 30 s on 2 cores in the
    test session's teardown, which no test checks."""
    stop_group(head.process.pid, grace_s=5)
    head.process.wait()
    shutil.rmtree(head.temp_dir, ignore_errors=True)
