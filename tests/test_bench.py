"""The benchmark harness reads what the product prints: if a progress line changes, this fails before a
benchmark silently measures nothing. (The benchmarks themselves print ratios; they are not timed tests.)"""

from __future__ import annotations

import sys

from bench.measure import run_timed
from bench.perf import Figure, training_flops_per_step
from bench.workload import Workload
from orchestrator.launch.progress import format_event


def _step(step: int, tokens_per_s: float) -> dict:
    return {"event": "step", "step": step, "start_step": 0, "max_steps": 20, "elapsed": step * 0.1, "loss": 1.0,
            "tokens_per_s": tokens_per_s, "lr": 1e-3}


def test_orchestrator_console_lines_are_timed_and_parsed():
    lines = [format_event({"event": "first_step", "step": 1, "worker_s": 3.2})]
    lines += [format_event(_step(step, 1000.0 * step)) for step in (10, 20)]
    lines.append(format_event({"event": "checkpoint", "step": 20, "uri": "s3://b/r/checkpoints/step-00000020",
                               "blocked_s": 0.25}))
    script = "import time\n" + "".join(f"print({line!r}, flush=True); time.sleep(0.05)\n" for line in lines)
    timed = run_timed([sys.executable, "-c", script])
    assert sorted(timed.step_seen_s) == [1, 10, 20]
    assert timed.first_step_s <= timed.step_seen_s[20] < timed.exit_s
    assert timed.steady_tokens_per_s(skip_steps=10) == 20000.0  # the window after warm-up only
    assert timed.checkpoint_blocked_s == [0.25]


def test_baseline_lines_give_windowed_throughput():
    # 21 steps of 100 tokens, 0.1 s apart on the baseline's own clock: 1,000 tokens/s.
    script = "".join(f"print('STEP {s} {s * 0.1:.4f} 100')\n" for s in range(1, 22))
    timed = run_timed([sys.executable, "-c", script])
    assert abs(timed.steady_tokens_per_s(skip_steps=0) - 1000.0) < 1e-6


def test_figure_lines_are_machine_readable():
    assert Figure("x", 0.93, ">=", 0.9, "ratio").line() == "x: ratio=0.930 goal=>=0.9 met"
    assert Figure("t", 14.0, "<=", 12, "s", "bare 6 s").line() == "t: value_s=14.000 goal=<=12 missed  (bare 6 s)"
    assert Figure("c", 1.5, "<=", 2, "%").line() == "c: value_pct=1.500 goal=<=2 met"


def test_training_flops_grow_with_sequence_and_width():
    small, long_, wide = (Workload("m", "d", hidden, 4, seq) for hidden, seq in ((256, 64), (256, 256), (512, 64)))
    assert training_flops_per_step(long_) > 4 * training_flops_per_step(small)  # tokens ×4, attention more
    assert 3 < training_flops_per_step(wide) / training_flops_per_step(small) < 4.1  # matmuls ~×4, head ×2
