"""Fault injection for reliability tests: make rank 0 fail once after a given step of a given run.

Off unless ORCHESTRATOR_FAULTS names a JSON file {run id or pattern: step}. Each entry fires once (it is removed
before the failure), so the restarted worker group trains on: that is the point of the test.
"""

from __future__ import annotations

import fnmatch
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
    # Keys are run ids or shell patterns (a search trial's id is only known once it runs).
    key = next((k for k, at in faults.items() if at == step and fnmatch.fnmatchcase(run_id, k)), None)
    if key is None:
        return
    del faults[key]
    Path(path).write_text(json.dumps(faults))
    raise InjectedFault(f"injected fault after step {step} of run {run_id}")


def schedule_fault(path: str | Path, run_id: str, step: int) -> None:
    """Test side: ask for one failure of `run_id` after `step`."""
    path = Path(path)
    faults = json.loads(path.read_text() or "{}") if path.exists() else {}
    faults[run_id] = step
    path.write_text(json.dumps(faults))
