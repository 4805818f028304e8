"""Finding results in storage: the runs and searches under a storage URI, read into records.

One recursive listing per top-level folder (runs/, tune/) gives every file with its size and time;
the few small files a record needs (spec.yaml, metrics.jsonl, manifest.json, summary.json,
params.json) are then fetched in one concurrent batch. Nothing here writes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.results.uri import is_search
from orchestrator.storage.fs import Storage
from orchestrator.storage.layout import checkpoint_dir_name, checkpoint_step
from orchestrator.storage.manifest import MANIFEST_NAME

_RECORD_FILES = ("spec.yaml", "metrics.jsonl", MANIFEST_NAME, "summary.json", "params.json")


class _Stored:
    """What runs and searches share: a folder `path` below `storage_uri` and its files ({relative path: bytes})."""

    storage_uri: str
    path: str
    files: dict[str, int]

    @property
    def uri(self) -> str:
        return f"{self.storage_uri}/{self.path}"

    @property
    def name(self) -> str:
        """The job of a run; the search, for a search or one of its trials."""
        return self.path.split("/")[1]

    @property
    def size(self) -> int:
        return sum(self.files.values())


@dataclass
class RunRecord(_Stored):
    """One run, or one trial of a search, as it stands in storage."""

    storage_uri: str
    path: str                                 # runs/<job>/<run-id> or tune/<search>/trials/<trial-id>
    spec: dict[str, Any]                      # spec.yaml as stored (not re-validated: old runs stay readable)
    metrics: list[dict[str, Any]]             # metrics.jsonl, one entry per logged step
    manifest: dict[str, Any] | None           # written last: present only when the run completed
    summary: dict[str, Any] | None
    files: dict[str, int]                     # path relative to the run → size in bytes
    modified: datetime                        # the newest of its files
    params: dict[str, Any] | None = None      # the values a search sampled for this trial
    outcome: str | None = None                # the search's verdict on an unfinished trial (stopped early, error)
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = "trial" if self.path.startswith("tune/") else "run"

    @property
    def run_id(self) -> str:
        return self.path.rsplit("/", 1)[1]

    def setting(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.spec
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return default if node is None else node

    @property
    def method(self) -> str:
        return self.setting("adapter.method", "lora")

    @property
    def complete(self) -> bool:
        return self.manifest is not None and self.manifest.get("status", "complete") == "complete"

    @property
    def status(self) -> str:
        return "complete" if self.complete else (self.outcome or "incomplete")

    @property
    def steps(self) -> int:
        if self.complete and self.summary:
            return int(self.summary.get("steps", 0))
        return int(self.metrics[-1]["step"]) if self.metrics else 0

    @property
    def max_steps(self) -> int | None:
        return self.setting("train.max_steps")

    def best(self, metric: str = "eval_loss") -> tuple[int, float] | None:
        """(step, value) of the lowest logged value of `metric`."""
        points = [(m["step"], m[metric]) for m in self.metrics if isinstance(m.get(metric), (int, float))]
        return min(points, key=lambda point: point[1]) if points else None

    @property
    def final(self) -> dict[str, Any]:
        if self.complete and self.summary and self.summary.get("final"):
            return self.summary["final"]
        return self.metrics[-1] if self.metrics else {}

    @property
    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints whose manifest is in place, newest first."""
        steps = {checkpoint_step(name.split("/")[1]) for name in self.files
                 if name.startswith("checkpoints/") and name.endswith("/" + MANIFEST_NAME) and name.count("/") == 2}
        return sorted((step for step in steps if step is not None), reverse=True)

    @property
    def adapter_uri(self) -> str | None:
        """The final adapter; for an unfinished run, its newest complete checkpoint's adapter."""
        if self.complete and "adapter/adapter_config.json" in self.files:
            return f"{self.uri}/adapter"
        if self.checkpoints:
            return f"{self.uri}/checkpoints/{checkpoint_dir_name(self.checkpoints[0])}/adapter"
        return None


@dataclass
class SearchRecord(_Stored):
    """A Tune search: its trials (each an ordinary run) and what it published."""

    storage_uri: str
    path: str                                 # tune/<search>
    trials: list[RunRecord]
    manifest: dict[str, Any] | None
    files: dict[str, int]
    modified: datetime
    kind: str = "search"

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def status(self) -> str:
        return "complete" if self.complete else "incomplete"

    def ranked(self, metric: str = "eval_loss") -> list[RunRecord]:
        """Trials, best first; trials without a value of `metric` last."""
        return sorted(self.trials, key=lambda t: (t.best(metric) is None, t.best(metric)[1] if t.best(metric) else 0.0))

    @property
    def best_adapter_uri(self) -> str | None:
        return f"{self.uri}/best/adapter" if "best/adapter/adapter_config.json" in self.files else None


Record = RunRecord | SearchRecord


def list_results(storage: Storage, job: str | None = None) -> list[Record]:
    """Every run and search in `storage` (searches hold their trials), unsorted."""
    runs = _group(_files_under(storage, storage.path("runs", job) if job else storage.path("runs")), 1 if job else 2)
    runs = {(f"runs/{job}/{key[0]}" if job else f"runs/{key[0]}/{key[1]}"): files for key, files in runs.items()}
    searches = _group(_files_under(storage, storage.path("tune")), 1)
    return _records(storage, runs, {f"tune/{key[0]}": files for key, files in searches.items()})


def load_result(storage: Storage, path: str) -> Record:
    """The run, trial or search at `path` (as split_result_uri gives it)."""
    parts = path.split("/")
    search_path = "/".join(parts[:2]) if parts[0] == "tune" else None
    files = _files_under(storage, storage.path(search_path or path))
    if parts[0] == "runs":
        records = _records(storage, {path: files}, {})
    else:
        records = _records(storage, {}, {search_path: files})
        if len(parts) == 4:  # one trial of the search
            records = [t for r in records for t in r.trials if t.path == path]
    if not records or not records[0].files or (isinstance(records[0], RunRecord) and "spec.yaml" not in records[0].files):
        raise OrchestratorError(f"{storage.uri}/{path}: no {'search' if is_search(path) else 'run'} there "
                                f"(`orchestrator runs {storage.uri}` lists what is)")
    return records[0]


def parse_since(text: str) -> datetime:
    """`7d`, `12h`, `30m`, `2w` ago, or a date/time (`2026-11-01`, `2026-11-01T08:00`, local time)."""
    match = re.fullmatch(r"(\d+)\s*([mhdw])", text.strip())
    if match:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(match.group(1))})
    try:
        return datetime.fromisoformat(text.strip()).astimezone()
    except ValueError:
        raise OrchestratorError(f"--since: {text!r} is neither an age (7d, 12h, 30m, 2w) nor a date (2026-11-01)") from None


def matches(record: Record, job: str | None = None, method: str | None = None, since: datetime | None = None) -> bool:
    members = record.trials if isinstance(record, SearchRecord) else [record]
    if job is not None and record.name != job and all(m.setting("name") != job for m in members):
        return False
    if method is not None and all(m.method != method for m in members):
        return False
    return since is None or record.modified >= since


def flat_settings(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested spec dict."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from flat_settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _files_under(storage: Storage, path: str) -> dict[str, dict[str, Any]]:
    """{path relative to `path`: listing entry} of every file below it, from one recursive listing."""
    with storage.errors_in_one_line():
        try:
            found = storage.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
    prefix = path.rstrip("/") + "/"
    return {name[len(prefix):]: info for name, info in found.items()
            if name.startswith(prefix) and info.get("type") != "directory"}


def _group(files: dict[str, dict], depth: int) -> dict[tuple[str, ...], dict[str, dict]]:
    """Files grouped by their first `depth` path segments, each group keyed by the rest of the path."""
    groups: dict[tuple[str, ...], dict[str, dict]] = {}
    for relative, info in files.items():
        parts = relative.split("/")
        if len(parts) > depth:
            groups.setdefault(tuple(parts[:depth]), {})["/".join(parts[depth:])] = info
    return groups


def _modified(info: dict) -> datetime:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(float(stamp), timezone.utc)


def _newest(files: dict[str, dict]) -> datetime:
    return max((_modified(info) for info in files.values()), default=datetime.fromtimestamp(0, timezone.utc))


def _records(storage: Storage, runs: dict[str, dict], searches: dict[str, dict]) -> list[Record]:
    """Records for run folders and search folders (each {relative path: listing entry}), reading the
    small files they need in one batch."""
    trials = {f"{search}/trials/{key[1]}": files
              for search, search_files in searches.items()
              for key, files in _group(search_files, 2).items() if key[0] == "trials"}
    wanted = [f"{path}/{name}" for path, files in (runs | trials).items() for name in _RECORD_FILES if name in files]
    wanted += [f"{search}/{name}" for search, files in searches.items() for name in (MANIFEST_NAME, "leaderboard.csv") if name in files]
    contents = _read_many(storage, wanted)

    def run_record(path: str, files: dict[str, dict], outcomes: dict[str, str]) -> RunRecord:
        text = {name: contents.get(f"{path}/{name}") for name in _RECORD_FILES}
        return RunRecord(
            storage_uri=storage.uri, path=path, spec=_yaml(text["spec.yaml"]) or {}, metrics=_jsonl(text["metrics.jsonl"]),
            manifest=_json(text[MANIFEST_NAME]), summary=_json(text["summary.json"]),
            files={name: int(info.get("size") or 0) for name, info in files.items()}, modified=_newest(files),
            params=_json(text["params.json"]), outcome=outcomes.get(path.rsplit("/", 1)[1]),
        )

    records: list[Record] = [run_record(path, files, {}) for path, files in runs.items()]
    for search, files in searches.items():
        manifest = _json(contents.get(f"{search}/{MANIFEST_NAME}"))
        outcomes = _trial_outcomes(contents.get(f"{search}/leaderboard.csv"), finished=manifest is not None)
        members = [run_record(path, trial_files, outcomes) for path, trial_files in trials.items()
                   if path.startswith(search + "/")]
        records.append(SearchRecord(storage.uri, search, sorted(members, key=lambda t: t.path), manifest,
                                    {name: int(info.get("size") or 0) for name, info in files.items()}, _newest(files)))
    return records


def _trial_outcomes(leaderboard: bytes | None, finished: bool) -> dict[str, str]:
    """What the search said of trials that left no run manifest: stopped early (ASHA) or error."""
    if not leaderboard:
        return {}
    outcomes = {}
    for row in csv.DictReader(io.StringIO(leaderboard.decode())):
        if row.get("status") == "error":
            outcomes[row["trial"]] = "error"
        elif finished and row.get("stopped_early") == "True":
            outcomes[row["trial"]] = "stopped early"
    return outcomes


def _read_many(storage: Storage, relative_paths: list[str]) -> dict[str, bytes]:
    """{relative path: contents}, fetched concurrently (s3fs) in one call."""
    if not relative_paths:
        return {}
    by_full_path = {storage.path(relative): relative for relative in relative_paths}
    with storage.errors_in_one_line():
        found = storage.fs.cat(list(by_full_path), on_error="omit")
    return {by_full_path[name]: data for name, data in found.items() if name in by_full_path}


def _json(data: bytes | None) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _jsonl(data: bytes | None) -> list[dict]:
    lines = (data or b"").decode(errors="replace").splitlines()
    return [entry for entry in (_json(line.encode()) for line in lines if line.strip()) if isinstance(entry, dict)]


def _yaml(data: bytes | None) -> Any:
    try:
        return yaml.safe_load(data) if data else None
    except yaml.YAMLError:
        return None
