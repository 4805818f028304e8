"""Talking to a running Ray cluster's job server: its address, its auth token, one-line errors.

Ray's own `JobSubmissionClient` has no connect timeout and turns HTTP 401/403 into multi-line
messages; a quick probe first makes an unreachable head, a missing token and a wrong token each
a one-line error (exit 2) within seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError

PROBE_TIMEOUT_S = 5.0
_TOKEN_HELP = ("set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token "
               "(`ray get-auth-token` on the head prints it)")


class ClusterError(OrchestratorError):
    """The cluster cannot be reached, refuses us, or does not know what we asked about."""


def dashboard_url(address: str | None) -> str:
    """The job server's URL from --address or RAY_ADDRESS (`http://HEAD:8265`; a bare host:port gets http://)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise ClusterError(f"cluster address {address!r} is a Ray Client address; use the dashboard's, e.g. http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"cluster address {address!r}: expected http://HEAD:8265")
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    """The bearer token Ray's own tools send: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
    ~/.ray/auth_token; none if there is none.

    Read here, not through Ray's AuthenticationTokenLoader: that loader is one per process and is what a
    Ray driver in the same process (a notebook, a test session) authenticates with, so pointing it at
    another cluster's token broke that driver's connection to its own cluster.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def probe(url: str, headers: dict[str, str]) -> str:
    """Check the job server answers and accepts our token; return its Ray version."""
    import requests

    try:
        response = requests.get(f"{url}/api/version", headers=headers, timeout=PROBE_TIMEOUT_S)
    except requests.exceptions.ConnectTimeout:
        raise ClusterError(f"cluster {url}: no answer within {PROBE_TIMEOUT_S:g} s (is the address right and the port open?)") from None
    except requests.exceptions.ConnectionError as error:
        cause = "connection refused" if "refused" in str(error).lower() else "cannot connect"
        raise ClusterError(f"cluster {url}: {cause} (is the Ray head running, with its dashboard on this port?)") from None
    except requests.exceptions.RequestException as error:
        raise ClusterError(f"cluster {url}: {type(error).__name__}") from None
    if response.status_code == 401:
        raise ClusterError(f"cluster {url} requires a Ray auth token and none was found; {_TOKEN_HELP}")
    if response.status_code == 403:
        raise ClusterError(f"cluster {url} refused the Ray auth token (wrong token?); {_TOKEN_HELP}")
    try:
        response.raise_for_status()
        return response.json()["ray_version"]
    except Exception:
        raise ClusterError(f"cluster {url}: answered HTTP {response.status_code} but is not a Ray job server") from None


@dataclass
class Cluster:
    """A reachable cluster: its job server URL, the headers it accepted, and Ray's job client."""

    url: str
    headers: dict[str, str]
    client: Any

    def job_link(self, submission_id: str) -> str:
        return f"{self.url}/#/jobs/{submission_id}"

    def resources(self) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Total resources of the alive nodes, and each node's own (to see whether one worker fits a node)."""
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        state = StateApiClient(address=self.url, headers={"Content-Type": "application/json", **self.headers})
        nodes = state.list(StateResource.NODES, options=ListApiOptions(detail=True, limit=10_000), raise_on_missing_output=False)
        per_node = [dict(_field(node, "resources_total") or {}) for node in nodes if _field(node, "state") == "ALIVE"]
        total: dict[str, float] = {}
        for resources in per_node:
            for name, amount in resources.items():
                total[name] = total.get(name, 0.0) + amount
        return total, per_node


def connect(address: str | None) -> Cluster:
    """The cluster behind --address / RAY_ADDRESS, after the probe has passed."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    headers = auth_headers()
    probe(url, headers)
    return Cluster(url, headers, JobSubmissionClient(url, headers=dict(headers)))


def _field(node: Any, name: str) -> Any:
    return node.get(name) if isinstance(node, dict) else getattr(node, name, None)


def shortfall(needs: dict[str, float], per_worker: dict[str, float], num_workers: int,
              total: dict[str, float], per_node: list[dict[str, float]]) -> str | None:
    """Why the cluster, as it is now, cannot place the job (None when it can)."""
    lacking = [f"{name} {amount:g} (cluster has {total.get(name, 0):g})" for name, amount in needs.items()
               if total.get(name, 0) + 1e-9 < amount]
    if lacking:
        return "needs " + ", ".join(lacking)
    fitting = sum(min(int(node.get(name, 0) / amount + 1e-9) for name, amount in per_worker.items() if amount > 0)
                  for node in per_node)
    if fitting < num_workers:
        return f"only {fitting} of {num_workers} workers ({per_worker}) fit on the nodes as they are"
    return None
