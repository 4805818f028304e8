"""Fault injection for reliability tests: make rank 0 fail, or pause, once after a given step of a given run.

Off unless ORCHESTRATOR_FAULTS names a JSON file {run id or pattern: step | {"pause_s": seconds, "step": step}}.
The loop asks `hook_for` once, at start: without the variable (production) there is no hook and the loop
does nothing per step. With it, rank 0 reads the file after every step (a test may schedule a fault
while the run goes on). Each entry fires once (it is removed first), so a restarted worker group trains
on: that is the point of the test. A pause writes `<file>.paused` (run id and step) so that a test can
strike while the run stands still: kill a worker or the driver, or stop the object store; it lasts pause_s, or
until the test creates `<file>.release`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

ENV_VAR = "ORCHESTRATOR_FAULTS"


class InjectedFault(RuntimeError):
    pass


def hook_for(run_id: str, rank: int) -> Optional[Callable[[int], None]]:
    """`after_step(step)` for this worker, or None when no faults can be scheduled (the variable is unset, or
    the worker is not rank 0)."""
    path = os.environ.get(ENV_VAR)
    if not path or rank != 0:
        return None
    return lambda step: _fire_scheduled(Path(path), run_id, step)


def _fire_scheduled(path: Path, run_id: str, step: int) -> None:
    if not path.exists():
        return
    faults = json.loads(path.read_text() or "{}")
    # Keys are run ids or shell patterns (a search trial's id is only known once it runs).
    key = next((k for k, at in faults.items() if _step(at) == step and fnmatch.fnmatchcase(run_id, k)), None)
    if key is None:
        return
    fault = faults.pop(key)
    path.write_text(json.dumps(faults))
    if isinstance(fault, dict):
        Path(f"{path}.paused").write_text(json.dumps({"run_id": run_id, "step": step}))
        released = Path(f"{path}.release")
        deadline = time.monotonic() + fault["pause_s"]
        while time.monotonic() < deadline and not released.exists():  # a test may end its pauses early
            time.sleep(0.2)
        return
    raise InjectedFault(f"injected fault after step {step} of run {run_id}")


def _step(fault) -> int:
    return fault["step"] if isinstance(fault, dict) else fault


def schedule_fault(path: str | Path, run_id: str, step: int, pause_s: float | None = None) -> None:
    """Test side: ask for one failure (or, with `pause_s`, one pause) of `run_id` after `step`."""
    path = Path(path)
    faults = json.loads(path.read_text() or "{}") if path.exists() else {}
    faults[run_id] = step if pause_s is None else {"step": step, "pause_s": pause_s}
    path.write_text(json.dumps(faults))
    Path(f"{path}.paused").unlink(missing_ok=True)
    Path(f"{path}.release").unlink(missing_ok=True)
