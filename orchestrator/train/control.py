"""Stopping a run without losing a step, and keeping the work of a node that is about to go.

The driver asks for a stop (first Ctrl-C or SIGTERM to `orchestrator run`, or `orchestrator stop` of a submitted
job, which SIGTERMs its entrypoint) through a `StopRequest` actor; rank 0 watches it from a thread. At every step
boundary the ranks agree (one tiny all-reduce on a CPU group, so a GPU run does not wait on its device): they
checkpoint that step and return, and the driver exits with code 3. Ray Train reports a node about to be preempted
(a spot notice, a drain) through `ray.train.get_preemption_info`, itself a barrier across the workers, so it is
asked at logging steps only: the group checkpoints once and trains on; when the node goes, the run restarts from
that checkpoint, on fewer workers if it is elastic.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

POLL_S = 0.5


class StopRequest:
    """Driver side: a Ray actor (num_cpus=0) the workers read."""

    def __init__(self) -> None:
        self._asked = False

    def ask(self) -> None:
        self._asked = True

    def asked(self) -> bool:
        return self._asked


def start_stop_request():
    import ray

    return ray.remote(StopRequest).options(num_cpus=0).remote()


class StepBoundary:
    """Worker side: what the group does after a step, agreed by every rank."""

    def __init__(self, request: Optional[Any], rank: int, world: int):
        self.world = world
        self._asked = threading.Event()
        self._group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
        self._preemption_saved = False
        if request is not None and rank == 0:
            threading.Thread(target=self._watch, args=(request,), name="orchestrator-stop-watch", daemon=True).start()

    def _watch(self, request) -> None:
        import ray

        while not self._asked.is_set():
            try:
                if ray.get(request.asked.remote(), timeout=10):
                    self._asked.set()
                    return
            except Exception:  # the driver is gone or busy: Ray ends the run then anyway
                pass
            self._asked.wait(POLL_S)

    def stop_requested(self) -> bool:
        """Collective when world > 1: whether any rank saw the driver's request."""
        if self.world == 1:
            return self._asked.is_set()
        flag = torch.tensor([1 if self._asked.is_set() else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def preemption_checkpoint_due(self) -> bool:
        """Ask Ray Train whether a worker's node is about to be preempted (a barrier across the workers); True
        once per notice, so that the group checkpoints before the node goes."""
        import ray.train

        try:
            info = ray.train.get_preemption_info()
        except Exception:  # not inside Ray Train (in-process tests), or a Ray without it
            return False
        if info is None or self._preemption_saved:
            return False
        self._preemption_saved = True
        return True
