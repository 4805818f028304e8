"""Fault injection for reliability tests: make rank 0 fail once after a given step of a given run.

Off unless ORCHESTRATOR_FAULTS names a JSON file {run_id: step}. Each entry fires once (it is removed
before the failure), so the restarted worker group trains on: that is the point of the test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class InjectedFault(RuntimeError):
    pass


def maybe_fail(run_id: str, step: int, rank: int) -> None:
    path = os.environ.get("ORCHESTRATOR_FAULTS")
    if not path or rank != 0 or not Path(path).exists():
        return
    faults = json.loads(Path(path).read_text() or "{}")
    if faults.get(run_id) != step:
        return
    del faults[run_id]
    Path(path).write_text(json.dumps(faults))
    raise InjectedFault(f"injected fault after step {step} of run {run_id}")


def schedule_fault(path: str | Path, run_id: str, step: int) -> None:
    """Test side: ask for one failure of `run_id` after `step`."""
    path = Path(path)
    faults = json.loads(path.read_text() or "{}") if path.exists() else {}
    faults[run_id] = step
    path.write_text(json.dumps(faults))
