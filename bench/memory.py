"""bench `memory`: what a training worker holds at its peak, measured from outside, against the model's size
and against the memory plan (`orchestrator plan`'s estimate per worker).

Each case runs `orchestrator run --local` with 2 workers and reads every Ray Train worker's memory from /proc
until it exits: its peak resident memory (VmHWM, kept by the kernel), the same when the console says the
model is ready, and its anonymous memory (RssAnon, sampled: resident memory without the page cache of a
memory-mapped checkpoint, which every worker on the node shares). Python, torch, Ray and DeepSpeed take
several hundred MB in every worker whatever the model, so each figure is taken above the same job on a tiny
model (the default workload, h256/L4: 3.4M parameters).

- memory_zero3_peak_per_worker_vs_model: a ~300M-parameter Llama shape (h1024/L24), ZeRO-3, 2 workers, 1 × 32
  tokens: the larger worker's peak above the tiny run, ÷ the model's bytes (fp32). A worker that loads the
  whole base before partitioning it is ≥ 1.0; its own half is 0.5. memory_zero3_loaded_per_worker_vs_model:
  the same once the model is ready to train.
- memory_plan_vs_measured_*: |plan ÷ measured − 1| for three (ZeRO stage, batch, length) cases; measured is
  the anonymous peak above the tiny run's, plus the tiny run's own plan.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

import yaml

from bench.measure import python
from bench.perf import Bench, Figure
from bench.workload import job_spec

BIG = dict(hidden=1024, layers=24, seq=32)  # 302M parameters, 1.21 GB in fp32
STEPS = 4


@dataclass(frozen=True)
class Case:
    name: str
    shape: dict
    stage: int
    batch: int
    gradient_checkpointing: bool = False


CASES = [
    Case("z3_300m_b1_len32", BIG, 3, 1),
    Case("z2_300m_b4_len32", BIG, 2, 4),
    Case("z2_h256_b16_len512", dict(seq=512), 2, 16),
]


@dataclass
class Peaks:
    """One run's workers, largest first: peak resident bytes (VmHWM), the same when the model was ready (base
    loaded, adapter attached, DeepSpeed engine built), and peak anonymous bytes (RssAnon, sampled every 0.2 s:
    without the page cache of a memory-mapped checkpoint, shared by every worker on the node)."""

    resident: list[int]
    when_ready: list[int]
    anonymous: list[int]


def memory_figures(bench: Bench) -> list[Figure]:
    baselines = {stage: _measure(bench, Case(f"tiny_z{stage}", dict(seq=32), stage, 1)) for stage in (2, 3)}
    figures = []
    for case in CASES:
        measured, planned = _measure(bench, case)
        tiny, tiny_planned = baselines[case.stage]
        above = measured.anonymous[0] - tiny.anonymous[0] + tiny_planned
        print(f"memory {case.name}: workers' peak resident {[_mb(p) for p in measured.resident]} MB (tiny "
              f"{[_mb(p) for p in tiny.resident]}), when ready {[_mb(p) for p in measured.when_ready]} (tiny "
              f"{[_mb(p) for p in tiny.when_ready]}), anonymous {[_mb(p) for p in measured.anonymous]} (tiny "
              f"{[_mb(p) for p in tiny.anonymous]}); plan {_mb(planned)} MB (tiny {_mb(tiny_planned)})", flush=True)
        figures.append(Figure(f"memory_plan_vs_measured_{case.name}", abs(planned / above - 1), "<=", 0.25, "ratio",
                              f"plan {_mb(planned)} MB, measured {_mb(above)} MB per worker (anonymous memory above "
                              f"the tiny run, + its plan)"))
        if case is CASES[0]:
            model_bytes = bench.workload(**case.shape).base_parameters() * 4
            peak = (measured.resident[0] - tiny.resident[0]) / model_bytes
            ready = (measured.when_ready[0] - tiny.when_ready[0]) / model_bytes
            figures.append(Figure("memory_zero3_peak_per_worker_vs_model", peak, "<=", 0.65, "ratio",
                                  f"{_mb(measured.resident[0] - tiny.resident[0])} MB above the tiny run per worker, model "
                                  f"{_mb(model_bytes)} MB (fp32), ZeRO-3 on 2 workers, training included"))
            figures.append(Figure("memory_zero3_loaded_per_worker_vs_model", ready, "<=", 0.65, "ratio",
                                  "the same when the model is ready to train (base loaded and partitioned, engine built)"))
    return figures


def _mb(value: float) -> int:
    return round(value / 2**20)


def _measure(bench: Bench, case: Case) -> tuple[Peaks, int]:
    """(the workers' peaks, the plan's per-worker estimate) of one run of `case`."""
    import orchestrator
    from orchestrator.spec import validate_spec

    workload = bench.workload(**case.shape)
    spec = job_spec(workload, name=f"bench-memory-{case.name.replace('_', '-')}", steps=STEPS, workers=2,
                    zero_stage=case.stage, log_every=1)
    spec["train"].update(batch_size=case.batch, gradient_checkpointing=case.gradient_checkpointing)
    planned = orchestrator.plan(validate_spec(spec)).memory.total
    return _worker_peaks(bench, spec, case.name), planned


def _worker_peaks(bench: Bench, spec: dict, tag: str) -> Peaks:
    path = bench.root / f"memory-{tag}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "ORCHESTRATOR_STORE_DIR": str(bench.root / f"store-memory-{tag}")}
    process = subprocess.Popen(python("-m", "orchestrator", "run", "--local", str(path)), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    resident: dict[int, int] = {}
    anonymous: dict[int, int] = {}
    poller = threading.Thread(target=_poll_workers, args=(process, resident, anonymous), daemon=True)
    poller.start()
    output, when_ready = [], {}
    for line in process.stdout:
        output.append(line)
        if line.startswith("model ready"):
            time.sleep(0.5)  # a poll after the line
            when_ready = dict(resident)
    process.wait()
    poller.join()
    if process.returncode != 0 or len(resident) < 2:
        raise RuntimeError(f"memory run {tag} exited {process.returncode} with {len(resident)} workers seen:\n{''.join(output[-40:])}")
    # The run's workers: the largest peaks (Ray may have started an idle worker process besides them).
    workers = spec["scaling"]["num_workers"]
    largest = lambda peaks: sorted(peaks.values(), reverse=True)[:workers]  # noqa: E731
    return Peaks(largest(resident), largest(when_ready), largest(anonymous))


def _poll_workers(process: subprocess.Popen, resident: dict[int, int], anonymous: dict[int, int]) -> None:
    """Every Ray Train worker under `process`: its VmHWM (the kernel keeps the peak) and RssAnon, until it exits."""
    import psutil

    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            break
        for child in children:
            try:
                if "RayTrainWorker" not in " ".join(child.cmdline()):
                    continue
                status = dict(line.split(":", 1) for line in open(f"/proc/{child.pid}/status").read().splitlines() if ":" in line)
            except (psutil.Error, OSError):
                continue
            resident[child.pid] = max(resident.get(child.pid, 0), int(status["VmHWM"].split()[0]) * 1024)
            anonymous[child.pid] = max(anonymous.get(child.pid, 0), int(status["RssAnon"].split()[0]) * 1024)
        time.sleep(0.2)
