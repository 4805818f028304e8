"""Where a run's files live: runs/<job>/<run-id>/{spec.yaml, metrics.jsonl, checkpoints/, adapter/, manifest.json}
(a search trial's: tune/<search>/trials/<trial-id>/, the same files)."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

from orchestrator.storage.fs import Storage
from orchestrator.storage.manifest import is_complete

CHECKPOINT_PREFIX = "step-"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(dir_name: str) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", dir_name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunLayout:
    storage: Storage
    job: str
    run_id: str
    # runs/<job>/<run-id> for a run; tune/<search>/trials/<trial-id> for a search trial.
    root: str = "runs"

    @property
    def run_dir(self) -> str:
        return self.storage.path(self.root, self.job, self.run_id)

    def file(self, name: str) -> str:
        return f"{self.run_dir}/{name}"

    @property
    def spec(self) -> str:
        return self.file("spec.yaml")

    @property
    def metrics(self) -> str:
        return self.file("metrics.jsonl")

    @property
    def manifest(self) -> str:
        return self.file("manifest.json")

    @property
    def adapter_dir(self) -> str:
        return self.file("adapter")

    @property
    def checkpoints_dir(self) -> str:
        return self.file("checkpoints")

    def checkpoint(self, step: int) -> str:
        return f"{self.checkpoints_dir}/{checkpoint_dir_name(step)}"

    def checkpoint_steps(self) -> list[int]:
        steps = (checkpoint_step(name) for name in self.storage.list_dirs(self.checkpoints_dir))
        return sorted(step for step in steps if step is not None)

    def complete_checkpoints(self) -> list[int]:
        """Steps of checkpoints whose manifest exists and whose files are all present, newest first."""
        return [step for step in reversed(self.checkpoint_steps()) if is_complete(self.storage, self.checkpoint(step))]

    @property
    def path(self) -> str:
        """Relative to the storage root, as `orchestrator runs` prints it and show/compare/export take it."""
        return f"{self.root}/{self.job}/{self.run_id}"

    @property
    def uri(self) -> str:
        return f"{self.storage.uri}/{self.path}"


def trial_layout(storage: Storage, search: str, trial_id: str) -> RunLayout:
    """A search trial is stored as a run, at tune/<search>/trials/<trial-id>."""
    return RunLayout(storage, f"{search}/trials", trial_id, root="tune")


def result_layout(storage: Storage, path: str) -> RunLayout:
    """The run or trial at `path`: runs/<job>/<run-id> or tune/<search>/trials/<trial-id> (as split_result_uri gives it)."""
    parts = path.split("/")
    return trial_layout(storage, parts[1], parts[3]) if parts[0] == "tune" else RunLayout(storage, parts[1], parts[2])


def job_run_ids(storage: Storage, job: str) -> list[str]:
    """Run ids of a job, oldest first (ids start with a timestamp)."""
    return storage.list_dirs(storage.path("runs", job))
