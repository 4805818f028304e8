"""The CPU benchmarks of issue 9, each run side by side with its baseline in one process tree.

Every function returns Figures; bench/__main__.py prints them. Contenders run as commands (so that
start-up and exit count) on the same workload (bench.workload): same model, batches, order and steps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from bench.measure import Timed, python, run_timed
from bench.workload import BATCH, Workload, build_workload, job_spec


@dataclass
class Figure:
    name: str
    value: float
    op: str       # "<=" or ">="
    goal: float
    unit: str     # "ratio", "s" or "%"
    detail: str = ""

    @property
    def met(self) -> bool:
        return self.value <= self.goal if self.op == "<=" else self.value >= self.goal

    def line(self) -> str:
        key = "ratio" if self.unit == "ratio" else f"value_{self.unit.replace('%', 'pct')}"
        text = f"{self.name}: {key}={self.value:.3f} goal={self.op}{self.goal:g} {'met' if self.met else 'missed'}"
        return f"{text}  ({self.detail})" if self.detail else text


@dataclass
class Bench:
    root: Path          # workloads, specs and each run's embedded store live here
    steps: int          # optimizer steps per contender
    warmup_steps: int = 10

    def workload(self, **shape) -> Workload:
        return build_workload(self.root / "workload", **shape)

    def orchestrator(self, spec: dict, tag: str, env: dict | None = None) -> Timed:
        """`orchestrator run --local` as a user types it; local mode starts (and stops) its own store."""
        path = self.root / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = {**os.environ, "ORCHESTRATOR_STORE_DIR": str(self.root / f"store-{tag}"), **(env or {})}
        return run_timed(python("-m", "orchestrator", "run", "--local", str(path)), env=env)

    @contextmanager
    def warm_runtime(self, tag: str) -> Iterator[tuple[dict, float]]:
        """`orchestrator up` in a home of its own (so that no user's warm runtime is touched); yields the
        environment that runs use it with, and the seconds `up` took. `orchestrator down` after."""
        env = {"ORCHESTRATOR_HOME": str(self.root / f"home-{tag}"), "ORCHESTRATOR_STORE_DIR": str(self.root / f"store-{tag}")}
        started = time.monotonic()
        subprocess.run(python("-m", "orchestrator", "up"), env={**os.environ, **env}, check=True, capture_output=True)
        try:
            yield env, time.monotonic() - started
        finally:
            subprocess.run(python("-m", "orchestrator", "down"), env={**os.environ, **env}, check=True, capture_output=True)

    def baseline(self, kind: str, spec: dict, tag: str) -> Timed:
        path = self.root / f"{tag}.json"
        path.write_text(json.dumps(spec))
        return run_timed(python("-m", "bench.baselines", kind, str(path)))


def throughput(bench: Bench) -> list[Figure]:
    """1 worker, ZeRO-0, against the loop a user would write with PEFT: mean wall time per step, on the bench model
    and on one ten times larger (where the model's math dominates and the orchestration should cost ~nothing)."""
    figures = _throughput_pair(bench, bench.workload(), "", bench.steps, goal=0.95)
    small, large = bench.workload(), bench.workload(**LARGE_SHAPE)
    size = large.base_parameters() / small.base_parameters()
    # Each of its steps costs ~10x: half the steps keep the suite's time in bounds and still leave 40 steady ones.
    return figures + _throughput_pair(bench, large, "_10x", max(bench.steps // 2, bench.warmup_steps + 20), goal=0.98,
                                      note=f"h{large.hidden}/L{large.layers}, {size:.1f}x the bench model's parameters; ")


# A Llama shape with ~10x the bench model's parameters (h256/L4: 3.3M base parameters; this: 34.9M, 10.6x).
LARGE_SHAPE = {"hidden": 512, "layers": 11}


def _throughput_pair(bench: Bench, workload: Workload, suffix: str, steps: int, goal: float, note: str = "") -> list[Figure]:
    spec = job_spec(workload, name=f"bench-throughput{suffix.replace('_', '-')}", steps=steps, workers=1, zero_stage=0)
    plain = bench.baseline("plain", spec, f"throughput{suffix}-plain")
    ours = bench.orchestrator(spec, f"throughput{suffix}")
    plain_rate, our_rate = plain.steady_tokens_per_s(bench.warmup_steps), ours.steady_tokens_per_s(bench.warmup_steps)
    plain_step, our_step = plain.mean_step_wall_s(bench.warmup_steps), ours.mean_step_wall_s(bench.warmup_steps)
    return [
        # Same batches and steps: the ratio of mean wall times per step is the ratio of throughputs a user sees.
        Figure(f"throughput_vs_plain_peft{suffix}", plain_step / our_step, ">=", goal, "ratio",
               f"{note}mean wall time per step from the bench's clock: {1000 * our_step:.1f} vs {1000 * plain_step:.1f} ms"),
        Figure(f"throughput_vs_plain_peft{suffix}_median_window", our_rate / plain_rate, ">=", 0.90, "ratio",
               f"median of 10-step windows, each contender's own clock: {our_rate:,.0f} vs {plain_rate:,.0f} tok/s"),
    ]


def overhead(bench: Bench) -> list[Figure]:
    """2 workers, ZeRO-2, against the same model, optimizer and DeepSpeed config launched bare (no Ray)."""
    spec = job_spec(bench.workload(), name="bench-overhead", steps=bench.steps, workers=2, zero_stage=2)
    bare = bench.baseline("deepspeed", spec, "overhead-bare")
    ours = bench.orchestrator(spec, "overhead")
    with bench.warm_runtime("overhead-warm") as (env, up_s):
        warm = bench.orchestrator(spec, "overhead-warm", env=env)
    bare_rate, our_rate = bare.steady_tokens_per_s(bench.warmup_steps), ours.steady_tokens_per_s(bench.warmup_steps)
    return [
        Figure("step_time_vs_bare_deepspeed", bare_rate / our_rate, "<=", 1.05, "ratio",
               f"{our_rate:,.0f} vs {bare_rate:,.0f} tok/s"),
        Figure("time_to_first_step", ours.first_step_s, "<=", 12, "s",
               f"bare DeepSpeed {bare.first_step_s:.1f} s, ratio {ours.first_step_s / bare.first_step_s:.2f}"),
        Figure("time_to_first_step_warm_vs_cold", warm.first_step_s / ours.first_step_s, "<=", 0.5, "ratio",
               f"warm {warm.first_step_s:.1f} s vs cold {ours.first_step_s:.1f} s, the same job after `orchestrator up` "
               f"({up_s:.1f} s, once); warm: {_start_phases(warm)}; cold: {_start_phases(ours)}"),
        Figure("last_step_to_exit", ours.teardown_s, "<=", 5, "s",
               f"adapter, summary and manifests in storage; bare DeepSpeed {bare.teardown_s:.1f} s without saving"),
    ]


def _start_phases(timed: Timed) -> str:
    """Where a run's start went, from its console lines: Ray and storage ready (the run named), the worker loop
    started (the first step's line says how long after), the model ready, the first step."""
    phases = [("run named", timed.seen_s("new run ")), ("model ready", timed.seen_s("model ready"))]
    first = next((match for line in timed.output if (match := re.search(r"step \d+ done \(([\d.]+) s after the worker started", line))), None)
    if first:
        phases.insert(1, ("worker loop", timed.first_step_s - float(first[1])))
    return ", ".join(f"{name} {at:.1f} s" for name, at in [*phases, ("step 1", timed.first_step_s)] if at is not None)


def checkpoint_cost(bench: Bench, checkpoint_every: int = 50) -> list[Figure]:
    """Bytes of one checkpoint's adapter against the base model, and time the loop stood still for it."""
    workload = bench.workload()
    steps = max(bench.steps, checkpoint_every + bench.warmup_steps)
    spec = job_spec(workload, name="bench-checkpoint", steps=steps, workers=2, zero_stage=2,
                    checkpoint_every=checkpoint_every)
    ours = bench.orchestrator(spec, "checkpoint")
    adapter_bytes = _stored_adapter_bytes(bench.root / "store-checkpoint")
    base_bytes = sum(f.stat().st_size for f in Path(workload.model_dir).glob("*.safetensors"))
    mid_run = ours.checkpoint_blocked_s[:-1]  # the last one is part of last_step_to_exit
    training_s = ours.step_seen_s[max(ours.step_seen_s)] - ours.first_step_s
    return [
        Figure("adapter_bytes_vs_base", adapter_bytes / base_bytes, "<=", 0.01, "ratio",
               f"{adapter_bytes:,} vs {base_bytes:,} bytes"),
        Figure("adapter_bytes_vs_base_llama2_7b", _adapter_fraction_at_7b(spec), "<=", 0.01, "ratio",
               "same job on Llama-2-7B's config: exact counts from `orchestrator plan`, same dtype for both"),
        Figure("checkpoint_blocking_share", 100 * sum(mid_run) / training_s, "<=", 2, "%",
               f"{len(mid_run)} checkpoint(s) every {checkpoint_every} steps blocked {sum(mid_run):.2f} s "
               f"of {training_s:.1f} s training"),
    ]


def _adapter_fraction_at_7b(spec: dict) -> float:
    from transformers import LlamaConfig

    from orchestrator.plan import build_plan
    from orchestrator.spec import validate_spec

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    plan = build_plan(validate_spec(spec), config)
    return plan.trainable_parameters / plan.base_parameters


def _stored_adapter_bytes(store_dir: Path) -> int:
    """The final adapter's safetensors size, read back from the run's (restarted) embedded store."""
    from orchestrator.storage.fs import open_storage
    from orchestrator.storage.objectstore import DEFAULT_BUCKET, DEFAULT_STORAGE, embedded_store

    with embedded_store(None, data_dir=store_dir, wait_for_stop=True):
        storage = open_storage(DEFAULT_STORAGE)
        found = [p for p in storage.fs.find(f"{DEFAULT_BUCKET}/runs/bench-checkpoint")
                 if p.endswith("/adapter/adapter_model.safetensors")]
        return storage.fs.size(found[0])


def scaling(bench: Bench) -> list[Figure]:
    """Step time against sequence length and model size (1 worker, ZeRO-0), each growth divided by the
    growth of training FLOPs: a ratio near or below 1 means cost grows no faster than the work."""
    points = {"seq": [dict(seq=64), dict(seq=128), dict(seq=256)],
              "model": [dict(hidden=128), dict(hidden=256), dict(hidden=512)]}
    figures = []
    for axis, shapes in points.items():
        measured = []
        for shape in shapes:
            workload = bench.workload(**shape)
            spec = job_spec(workload, name=f"bench-scaling-{axis}", steps=bench.steps, workers=1, zero_stage=0)
            rate = bench.orchestrator(spec, f"scaling-{axis}-{'-'.join(map(str, shape.values()))}").steady_tokens_per_s(
                bench.warmup_steps)
            measured.append((workload, BATCH * workload.seq / rate, training_flops_per_step(workload)))
        (small, t0, f0), (large, t1, f1) = measured[0], measured[-1]
        steps_ms = ", ".join(f"{w.seq if axis == 'seq' else w.hidden}: {t * 1000:.0f} ms" for w, t, _ in measured)
        figures.append(Figure(f"scaling_{axis}_time_growth_vs_flops_growth", (t1 / t0) / (f1 / f0), "<=", 1.25, "ratio",
                              f"step time {steps_ms}; FLOPs ×{f1 / f0:.2f}, time ×{t1 / t0:.2f}"))
    return figures


def training_flops_per_step(workload: Workload) -> float:
    """LoRA accounting per token: 4·N_base (forward + input gradients through the frozen base) + 6·N_adapter,
    plus attention scores and values (forward 4·seq·hidden per layer, ×3 with backward)."""
    from bench.workload import RANK

    hidden, layers, seq = workload.hidden, workload.layers, workload.seq
    intermediate = hidden * 8 // 3
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    head = hidden * 260
    base = layers * per_layer + head
    adapter = layers * RANK * (4 * (hidden + hidden) + 3 * (hidden + intermediate))  # all-linear leaves lm_head out
    attention = 3 * 4 * seq * hidden * layers
    return BATCH * seq * (4 * base + 6 * adapter + attention)


_PREPARE_DATA = """
import json, sys, time
from orchestrator.spec import JobSpec
from orchestrator.train.data import prepare_data
from orchestrator.train.model import load_tokenizer
spec = JobSpec.model_validate(json.loads(sys.argv[1]))
tokenizer = load_tokenizer(spec.model.path)
started = time.perf_counter()
data = prepare_data(spec, spec.data.path, None, tokenizer)
print(json.dumps({"seconds": time.perf_counter() - started, "examples": len(data.train) + len(data.eval)}))
"""


def data_cache(bench: Bench, examples: int = 40_000, characters: int = 512) -> list[Figure]:
    """What a worker spends on its data before the first step, the first time (tokenizing) and then on a
    restart, a resume or another trial (reading the node's cache): each in a fresh process, as workers are."""
    import random
    import string
    import subprocess

    workload = bench.workload()
    data_path = bench.root / f"long-{examples}.jsonl"
    if not data_path.exists():
        rng = random.Random(0)
        with open(data_path, "w") as out:
            for _ in range(examples):
                words = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(characters))
                out.write(json.dumps({"prompt": words[: characters // 4], "completion": words[characters // 4:]}) + "\n")
    spec = job_spec(workload, name="bench-data", steps=1, workers=1, zero_stage=0)
    spec["data"] |= {"path": str(data_path), "max_length": characters}
    env = {**os.environ, "HF_DATASETS_CACHE": str(bench.root / f"hf-datasets-{os.getpid()}")}

    def prepare() -> dict:
        done = subprocess.run(python("-c", _PREPARE_DATA, json.dumps(spec)), env=env, capture_output=True,
                              text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, again = prepare(), prepare()
    return [Figure("data_preparation_cached_vs_first", again["seconds"] / first["seconds"], "<=", 0.1, "ratio",
                   f"{first['examples']:,} examples of {characters} characters: tokenized in {first['seconds']:.2f} s, "
                   f"read back in {again['seconds']:.3f} s")]
