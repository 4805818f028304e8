"""Stopping a run without losing a step, and keeping the work of a node that is about to go.

The driver asks for a stop (first Ctrl-C or SIGTERM to `orchestrator run`, or `orchestrator stop` of a submitted
job, which SIGTERMs its entrypoint) through a `StopRequest` actor (launch/stopping.py); rank 0 watches it from a thread. Ray Train marks
every worker of a node about to be preempted (a spot notice, a drain: its preemption watcher). At every step
boundary the ranks agree on both at once (one tiny all-reduce on a CPU group, so a GPU run does not wait on its
device). A stop: they checkpoint that step and return, and the driver exits with code 3. A preemption: they
checkpoint once and train on; when the node goes, the run restarts from that checkpoint, on fewer workers if it is
elastic. (`ray.train.get_preemption_info` would agree through Ray's own barrier, tens of milliseconds on every
call; the worker's mark is read here and agreed with the stop flag instead.)
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

# Rank 0 asks the driver's actor once per this many seconds, and the answer comes at once when a stop is asked
# (a long poll): polled every 0.5 s instead, the RPCs took about 2% of the worker's time on 2 cores.
WAIT_S = 30.0


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
                if ray.get(request.asked.remote(WAIT_S), timeout=WAIT_S + 10):
                    self._asked.set()
                    return
            except Exception:  # the driver is gone or busy: Ray ends the run then anyway
                self._asked.wait(1.0)

    def agree(self) -> tuple[bool, bool]:
        """(stop, checkpoint before a node goes), the same on every rank. Collective when world > 1."""
        flags = torch.tensor([int(self._asked.is_set()), int(_preemption_noticed())])
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        stop, preempted = bool(flags[0]), bool(flags[1])
        if preempted and self._preemption_saved:
            return stop, False
        self._preemption_saved = self._preemption_saved or preempted
        return stop, preempted


def _preemption_noticed() -> bool:
    """Whether Ray Train has marked this worker's node (or its slice) as about to be preempted. Read from the
    worker's train context (internal to Ray: without it, no notice is seen and nothing else changes)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # outside Ray Train (in-process tests), or another Ray
        return False


class SchedulerGate:
    """Under a search scheduler that pauses trials (HyperBand, PBT), a trial's workers wait at each checkpoint they
    report until Tune has let the trial go on (launch/trial.py acknowledges). Without it the workers train on while
    Tune decides, and a trial paused at step N would have run further, even to its end, before it was stopped."""

    def __init__(self, acknowledgements: Optional[Any], rank: int, rungs: tuple[int, ...] = ()):
        self.acknowledgements, self.rank = acknowledgements, rank
        self.rungs = frozenset(rungs)  # steps the scheduler decides at (sha): evaluated and checkpointed whatever the spec says

    def decides_at(self, step: int) -> bool:
        return step in self.rungs

    def wait(self) -> None:
        """Collective: rank 0 waits for the acknowledgement, every rank for rank 0."""
        if self.acknowledgements is None:
            return
        if self.rank == 0:
            self.acknowledgements.get()
        dist.barrier()
