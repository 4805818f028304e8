"""`orchestrator runs / show / compare`: what runs and searches left in storage, as tables and loss curves.

`show` writes the run's loss curves next to it (`<run>/curves.png`; a finished search keeps the
curves.png it published) and a local copy; `compare` writes one local plot of several runs.
"""

from __future__ import annotations

import os
import sys
import time
import webbrowser
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import yaml

from orchestrator.builtin import cache_home
from orchestrator.errors import OrchestratorError
from orchestrator.results.curves import comparison_png, run_curves_png
from orchestrator.results.records import (
    Record, RunRecord, SearchRecord, flat_settings, list_results, load_result, matches, parse_since,
)
from orchestrator.results.text import sampled_values, short
from orchestrator.results.uri import served_storage, split_result_uri
from orchestrator.storage.fs import describe_storage_error
from orchestrator.storage.layout import checkpoint_dir_name
from orchestrator.storage.manifest import read_manifest
from orchestrator.storage.objectstore import DEFAULT_STORAGE

# Columns `compare` always shows; every other spec field appears only where the runs differ.
_SHOWN_SETTINGS = ("adapter.method", "adapter.r", "optim.lora_plus_ratio", "optim.lr", "train.max_steps")
# Not settings of the training itself, or the same for every run of a comparison by construction.
_UNCOMPARED_SECTIONS = ("name", "storage", "tune", "tracking")


@dataclass
class Report:
    record: Record
    packages: dict[str, str]
    curves_uri: str | None          # next to the run in storage; None when the store refused the write
    curves_path: Path               # the local copy


@dataclass
class Comparison:
    runs: list[RunRecord]
    differing: list[str]            # dotted spec fields whose values differ between the runs
    plot_path: Path


def runs(storage_uri: str | None = None, *, job: str | None = None, method: str | None = None, since: str | None = None,
         endpoint_url: str | None = None, echo=print) -> list[Record]:
    """Runs and searches in `storage_uri` (default: local mode's store), newest first."""
    cutoff = parse_since(since) if since else None  # a bad --since fails before the store is started
    with served_storage((storage_uri or DEFAULT_STORAGE).rstrip("/"), endpoint_url, echo) as storage:
        records = list_results(storage, job)
    return sorted((r for r in records if matches(r, job, method, cutoff)), key=lambda r: r.modified, reverse=True)


def show(uri: str, *, storage_uri: str | None = None, endpoint_url: str | None = None, out: str | Path | None = None,
         echo=print) -> Report:
    """One run, trial or search: its record, package versions, and its loss curves written next to it."""
    where, path = split_result_uri(uri, storage_uri)
    _check_plot_path(out)
    with served_storage(where, endpoint_url, echo) as storage:
        record = load_result(storage, path)
        packages = (record.manifest or {}).get("packages") or _checkpoint_packages(storage, record)
        png, curves_uri = _curves(storage, record, echo)
    return Report(record, packages, curves_uri, _save(png, out, "-".join(p for p in path.split("/")[1:] if p != "trials")))


def compare(uris: Sequence[str], *, storage_uri: str | None = None, endpoint_url: str | None = None,
            out: str | Path | None = None, echo=print) -> Comparison:
    """Several runs (a search stands for all its trials, best first): one table and one plot."""
    targets = [split_result_uri(uri, storage_uri) for uri in uris]  # every argument is checked before any reading
    _check_plot_path(out)
    loaded: dict[tuple[str, str], list[RunRecord]] = {}
    for where in dict.fromkeys(where for where, _ in targets):
        with served_storage(where, endpoint_url, echo) as storage:
            for target in (t for t in targets if t[0] == where):
                record = load_result(storage, target[1])
                loaded[target] = record.ranked() if isinstance(record, SearchRecord) else [record]
    chosen = list({run.uri: run for target in targets for run in loaded[target]}.values())
    if len(chosen) < 2:
        raise OrchestratorError(f"compare: needs at least two runs (got {len(chosen)}); name more runs, or a search")
    png = comparison_png(f"{len(chosen)} runs", [(_label(run), run.metrics) for run in chosen])
    return Comparison(chosen, differing_settings(chosen), _save(png, out, time.strftime("compare-%Y%m%d-%H%M%S")))


def open_plot(path: Path, echo=print) -> bool:
    """Open the PNG in the desktop's viewer; on a machine without a desktop, say where it is instead."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        echo(f"--open: no desktop here (DISPLAY is not set); the plot is {path}")
        return False
    if not webbrowser.open(Path(path).resolve().as_uri()):
        echo(f"--open: found no viewer; the plot is {path}")
        return False
    return True


def differing_settings(runs: Sequence[RunRecord]) -> list[str]:
    flat = [dict(flat_settings(run.spec)) for run in runs]
    keys = dict.fromkeys(key for settings in flat for key in settings)
    return [key for key in keys if key.split(".")[0] not in _UNCOMPARED_SECTIONS and key not in _SHOWN_SETTINGS
            and len({repr(settings.get(key)) for settings in flat}) > 1]


def _checkpoint_packages(storage, record: Record) -> dict[str, str]:
    """An unfinished run has no run manifest yet, but each complete checkpoint records the versions too."""
    if isinstance(record, RunRecord) and record.checkpoints:
        manifest = read_manifest(storage, storage.path(record.path, "checkpoints", checkpoint_dir_name(record.checkpoints[0])))
        return (manifest or {}).get("packages", {})
    return {}


def _curves(storage, record: Record, echo) -> tuple[bytes, str | None]:
    """The loss-curves PNG and where it lies in storage: drawn now and written next to the run, or, for a
    finished search, the curves.png it published (listed in its manifest, so never overwritten)."""
    uri, path = f"{record.uri}/curves.png", storage.path(record.path, "curves.png")
    if isinstance(record, SearchRecord) and record.complete and "curves.png" in record.files:
        return storage.read_bytes(path), uri
    if isinstance(record, RunRecord):
        png = run_curves_png(f"{record.name} / {record.run_id}: loss", record.metrics)
    else:
        png = comparison_png(f"search {record.name}", [(trial.run_id, trial.metrics) for trial in record.ranked()])
    try:
        storage.write_bytes(path, png)
        return png, uri
    except Exception as error:  # read-only credentials still get the local copy
        echo(f"note: could not write {uri} ({describe_storage_error(error)}); kept the local copy only")
        return png, None


def _check_plot_path(out: str | Path | None) -> None:
    if out is not None and Path(out).suffix.lower() != ".png":
        raise OrchestratorError(f"--out {out}: the plot is a PNG; name the file *.png")


def _save(png: bytes, out: str | Path | None, name: str) -> Path:
    path = Path(out) if out else cache_home() / "plots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def _label(run: RunRecord) -> str:
    return f"{run.name}/{run.run_id}"


# ---- display: rows and lines for the CLI (plain strings, already formatted) ----

def overview_row(record: Record) -> dict[str, str]:
    """One line of `orchestrator runs`."""
    members = record.trials if isinstance(record, SearchRecord) else [record]
    best = [b[1] for b in (m.best() for m in members) if b]
    return {
        "name": record.name, "run": record.path,
        "method": ",".join(sorted({m.method for m in members})) or "–",
        "r": _span(m.setting("adapter.r") for m in members),
        "lora+": _span(m.setting("optim.lora_plus_ratio") for m in members),
        "steps": f"{len(members)} trials" if isinstance(record, SearchRecord) else f"{record.steps}/{record.max_steps or '?'}",
        "best eval loss": _number(min(best)) if best else "–",
        "status": record.status, "when": _when(record.modified), "size": _size(record.size),
    }


def run_details(report: Report) -> list[tuple[str, str]]:
    """(label, text) lines of `orchestrator show` for a run or trial; the spec comes last, as YAML."""
    run: RunRecord = report.record  # type: ignore[assignment]
    summary = run.summary or {}
    method = [run.method] + [f"{key} {short(run.setting('adapter.' + key))}" for key in ("r", "alpha") if run.setting("adapter." + key) is not None]
    if run.setting("optim.lora_plus_ratio") is not None:
        method.append(f"LoRA+ ratio {run.setting('optim.lora_plus_ratio'):g}")
    method += [f"lr {short(run.setting('optim.lr'))}", f"ZeRO-{run.setting('deepspeed.zero_stage', '?')}",
               f"{run.setting('scaling.num_workers', '?')} workers"]
    best = [f"{key} {_number(point[1])} at step {point[0]}" for key in ("eval_loss", "loss") if (point := run.best(key))]
    lines = [(run.kind, f"{run.uri}  ({run.status})"), ("job", run.setting("name", run.name)), ("method", " · ".join(method))]
    if run.params:
        lines.append(("sampled", sampled_values(run.params)))
    lines += [
        ("steps", f"{run.steps}/{run.max_steps or '?'}"
                  + (f" · wall {_duration(summary['wall_seconds'])}" if "wall_seconds" in summary else "")),
        ("trainable", f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters "
                      f"({summary['trainable_percent']:.3f}%)" if "trainable_parameters" in summary
         else "recorded when the run completes (`orchestrator plan JOB` estimates it)"),
        ("final", " · ".join(_metric(k, v) for k, v in sorted(run.final.items(), key=_metric_order) if k != "epoch")
         or "no metrics logged yet"),
        ("best", " · ".join(best) or "–"),
        ("adapter", run.adapter_uri or "none yet (no complete checkpoint)"),
    ]
    return lines + _common(report) + [("spec", yaml.safe_dump(run.spec, sort_keys=False).rstrip())]


def search_details(report: Report) -> list[tuple[str, str]]:
    search: SearchRecord = report.record  # type: ignore[assignment]
    ranked = search.ranked()
    lines = [("search", f"{search.uri}  ({search.status}, {len(search.trials)} trials)"),
             ("job", ", ".join(sorted({t.setting("name", "?") for t in search.trials})) or "–")]
    leader = ranked[0] if ranked and ranked[0].best() else None
    if leader is not None:
        step, value = leader.best()
        lines.append(("best", f"{leader.run_id}: eval_loss {_number(value)} at step {step}"))
        lines.append(("adapter", search.best_adapter_uri or leader.adapter_uri or "none yet"))
    return lines + _common(report)


def leaderboard_rows(search: SearchRecord) -> list[dict[str, str]]:
    rows = []
    for rank, trial in enumerate(search.ranked(), 1):
        best = trial.best()
        rows.append({"rank": str(rank), "run": trial.path, "method": trial.method,
                     "sampled": sampled_values(trial.params or {}) or "–",
                     "best eval loss": f"{_number(best[1])} @{best[0]}" if best else "–",
                     "steps": f"{trial.steps}/{trial.max_steps or '?'}", "status": trial.status})
    return rows


def comparison_rows(comparison: Comparison) -> list[dict[str, str]]:
    rows = []
    for run in comparison.runs:
        best, summary = run.best(), run.summary or {}
        rows.append({
            "run": run.path, "method": run.method, "r": short(run.setting("adapter.r")),
            "lora+": short(run.setting("optim.lora_plus_ratio")), "lr": short(run.setting("optim.lr")),
            "steps": f"{run.steps}/{run.max_steps or '?'}",
            "best eval loss": f"{_number(best[1])} @{best[0]}" if best else "–",
            "final loss": _number(run.final["loss"]) if "loss" in run.final else "–",
            "trainable": f"{summary['trainable_parameters']:,}" if "trainable_parameters" in summary else "–",
            "wall": _duration(summary["wall_seconds"]) if "wall_seconds" in summary else "–",
            "status": run.status,
            **{key: short(dict(flat_settings(run.spec)).get(key)) for key in comparison.differing},
        })
    return rows


def _common(report: Report) -> list[tuple[str, str]]:
    record = report.record
    return [
        ("packages", " · ".join(f"{name} {version}" for name, version in report.packages.items()) or "unknown (no manifest yet)"),
        ("updated", _when(record.modified)), ("size", _size(record.size)),
        ("curves", report.curves_uri or "not written to storage"), ("saved to", str(report.curves_path)),
    ]


def _span(values) -> str:
    present = sorted({v for v in values if v is not None})
    if not present:
        return "–"
    return short(present[0]) if len(present) == 1 else f"{short(present[0])}–{short(present[-1])}"


def _number(value: float) -> str:
    return f"{value:.4f}"


def _metric_order(item: tuple[str, Any]) -> int:
    order = ("step", "loss", "eval_loss")
    return order.index(item[0]) if item[0] in order else len(order)


def _metric(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return f"{key} {value}"
    if key.startswith("lr"):
        return f"{key} {value:.2e}"
    if isinstance(value, int) or key == "tokens_per_s":
        return f"{key} {value:,.0f}"
    return f"{key} {value:.4f}"


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"
