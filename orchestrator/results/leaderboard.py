"""What a finished search leaves in storage: leaderboard.csv/.md, curves.png, best/ (adapter, best.json), manifest.json."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator.results.curves import history_png
from orchestrator.results.text import sampled_values
from orchestrator.spec import JobSpec
from orchestrator.storage.layout import trial_layout
from orchestrator.storage.manifest import build_manifest, read_manifest, sha256_bytes, write_manifest


def trial_rows(spec: JobSpec, results, keys: dict[str, str], reported: Optional[Callable[[str], list[dict]]] = None) -> list[dict[str, Any]]:
    """One row per trial, best first: rank, params, best metric, steps run, steps trained, stopped early, wall time.
    `reported(trial_id)`: the results the trial itself logged (launch/trial.py's reported.jsonl), preferred to
    Tune's record, which a restore from a checkpoint rolls back."""
    metric, better = spec.tune.metric, (min if spec.tune.mode == "min" else max)
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial = trial_id_of(result)
        entries = (reported(trial) if reported else []) or _tune_entries(result.metrics_dataframe, metric)
        history = [(int(e["step"]), float(e[metric])) for e in entries
                   if isinstance(e.get(metric), (int, float)) and not math.isnan(e[metric])]
        steps = max((int(e["step"]) for e in entries), default=0)
        rows.append({
            "trial": trial,
            "params": {keys.get(k, k): v for k, v in (result.config or {}).items()},
            f"best_{metric}": better(v for _, v in history) if history else None,
            "steps": steps,
            "trained_steps": trained_steps(entries),
            "stopped_early": result.error is None and steps < spec.train.max_steps,
            "status": "error" if result.error is not None else "complete",
            "wall_s": round(float(metrics.get("time_total_s", 0.0)), 1),
            "history": history,
        })
    worst = math.inf if spec.tune.mode == "min" else -math.inf
    rows.sort(key=lambda r: r[f"best_{metric}"] if r[f"best_{metric}"] is not None else worst, reverse=spec.tune.mode == "max")
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


# Tune names a trial's directory <trainable>_<trial id>_<index>_<params>_<date>; a trial id is <5 hex>_<5 digits>.
_TRIAL_ID_IN_DIRNAME = re.compile(r"_([0-9a-f]{5}_\d{5})_")


def trial_id_of(result) -> str:
    """The trial a Tune result belongs to, from its directory. Not from its metrics: a trial PBT exploited carries
    the metrics of the trial it copied until it reports again, and one that copied a finished trial never does."""
    found = _TRIAL_ID_IN_DIRNAME.search(Path(result.path).name + "_")
    return found.group(1) if found else (result.metrics or {})["trial_id"]


def _tune_entries(frame, metric: str) -> list[dict]:
    if frame is None or "step" not in frame:
        return []
    columns = [c for c in ("step", metric, "resumed_from_step") if c in frame]
    return frame[columns].to_dict("records")


def trained_steps(entries: list[dict]) -> int:
    """Optimizer steps a trial trained, from its results in order: a result continues the one before it, or (after
    HyperBand paused the trial, or PBT restarted it from another trial's checkpoint) the step its run resumed from.
    Steps trained after a trial's last result, before a scheduler's stop reached it, are not seen (ASHA)."""
    total, previous = 0, None
    for entry in entries:
        start = entry.get("resumed_from_step", 0)
        step, start = int(entry["step"]), 0 if start is None or start != start else int(start)  # NaN: not reported
        continues = previous is not None and previous[1] == start and previous[0] < step
        total += step - (previous[0] if continues else start)
        previous = (step, start)
    return total


def publish(spec: JobSpec, search: str, storage, search_dir: str, fitted, echo) -> tuple[list[dict], dict]:
    results, keys = fitted

    def reported(trial_id: str) -> list[dict]:
        try:
            text = storage.read_bytes(trial_layout(storage, search, trial_id).file("reported.jsonl")).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    rows = trial_rows(spec, results, keys, reported)
    for row in rows:  # PBT's: each trial's copies and perturbations, as the trial recorded them (launch/trial.py)
        row["mutations"] = _mutations(storage, search, row["trial"]) if spec.tune.scheduler.type == "pbt" else []
    metric = f"best_{spec.tune.metric}"
    files = {
        "leaderboard.csv": _csv(rows, metric).encode(),
        "leaderboard.md": _markdown(rows, metric, search).encode(),
        "curves.png": _plot(rows, spec.tune.metric, search),
    }
    for name, data in files.items():
        storage.write_bytes(f"{search_dir}/{name}", data)
    best = next((row for row in rows if row[metric] is not None), None)
    if best is not None:
        best["adapter_from"] = _copy_best_adapter(storage, search, search_dir, best["trial"])
        storage.write_text(f"{search_dir}/best/best.json", json.dumps({k: v for k, v in best.items() if k != "history"}, indent=2, default=str))
        echo(f"best trial {best['trial']}: {spec.tune.metric} {best[metric]:.4f} with {best['params']}; adapter in {storage.uri}/tune/{search}/best")
    digests = {name: sha256_bytes(data) for name, data in files.items()}
    write_manifest(storage, search_dir, build_manifest(digests, search=search, trials=len(rows), best=best and best["trial"]))
    echo(f"leaderboard: {storage.uri}/tune/{search}/leaderboard.md")
    return rows, best or {}


def _copy_best_adapter(storage, search: str, search_dir: str, trial_id: str) -> str:
    """The trial's final adapter, or (if ASHA stopped it) the adapter of its last complete checkpoint."""
    layout = trial_layout(storage, search, trial_id)
    source = layout.adapter_dir if read_manifest(storage, layout.run_dir) else None
    if source is None:
        steps = layout.complete_checkpoints()
        if not steps:
            return "none (no complete checkpoint)"
        source = f"{layout.checkpoint(steps[0])}/adapter"
    with tempfile.TemporaryDirectory() as scratch:
        storage.download_dir(source, scratch)
        storage.upload_dir(scratch, f"{search_dir}/best/adapter")
    return source


def _csv(rows: list[dict], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "trial", "params", metric, "steps", "trained_steps", "stopped_early", "status", "wall_s", "mutations"])
    for r in rows:
        writer.writerow([r["rank"], r["trial"], json.dumps(r["params"]), r[metric], r["steps"], r["trained_steps"],
                         r["stopped_early"], r["status"], r["wall_s"], json.dumps(r.get("mutations", []))])
    return out.getvalue()


def _markdown(rows: list[dict], metric: str, search: str) -> str:
    lines = [f"# Search {search}", "", f"| rank | trial | params | {metric} | steps | stopped early | status | wall s |",
             "|---:|---|---|---:|---:|---|---|---:|"]
    for r in rows:
        value = f"{r[metric]:.4f}" if r[metric] is not None else "–"
        lines.append(f"| {r['rank']} | {r['trial']} | {sampled_values(r['params'])} | {value} | {r['steps']} | {'yes' if r['stopped_early'] else 'no'} | {r['status']} | {r['wall_s']} |")
    mutated = [r for r in rows if r.get("mutations")]
    if mutated:
        lines += ["", "## PBT mutations", "", "| trial | at step | copied from | params after |", "|---|---:|---|---|"]
        for r in mutated:
            lines += [f"| {r['trial']} | {m['step']} | {m['from_trial']} | {sampled_values(m['after'])} |" for m in r["mutations"]]
    return "\n".join(lines) + "\n"


def _mutations(storage, search: str, trial_id: str) -> list[dict]:
    try:
        return json.loads(storage.read_bytes(trial_layout(storage, search, trial_id).file("mutations.json")))
    except FileNotFoundError:
        return []


def _plot(rows: list[dict], metric: str, search: str) -> bytes:
    return history_png(f"search {search}: {metric} per trial", metric,
                       [(f"#{r['rank']} {r['trial']}", r["history"]) for r in rows])
