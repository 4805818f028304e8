"""Run one contender as a command and time it from outside: start, each step line, exit."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

_ORCHESTRATOR_STEP = re.compile(r"step\s+(\d+)/(\d+) \|.*\| ([\d,]+) tok/s")
_BASELINE_STEP = re.compile(r"^STEP (\d+) ([\d.]+) (\d+)$")
_FIRST_STEP = re.compile(r"step (\d+) done \(")
_CHECKPOINT = re.compile(r"checkpoint saved: \S+ \(blocked ([\d.]+) s\)")


@dataclass
class Timed:
    """One command's timeline, in seconds since it was started."""

    command: list[str]
    returncode: int = 0
    exit_s: float = 0.0
    step_seen_s: dict[int, float] = field(default_factory=dict)   # when each step's line arrived
    step_tokens_per_s: dict[int, float] = field(default_factory=dict)  # the orchestrator's own window figures
    step_clock: dict[int, tuple[float, int]] = field(default_factory=dict)  # baselines: (in-process clock, tokens)
    checkpoint_blocked_s: list[float] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    output_s: list[float] = field(default_factory=list)  # when each line of output arrived

    def seen_s(self, start: str) -> float | None:
        """When the first line starting with `start` arrived (None if none did)."""
        return next((at for at, line in zip(self.output_s, self.output) if line.startswith(start)), None)

    @property
    def first_step_s(self) -> float:
        return self.step_seen_s[min(self.step_seen_s)]

    @property
    def teardown_s(self) -> float:
        return self.exit_s - self.step_seen_s[max(self.step_seen_s)]

    def mean_step_wall_s(self, skip_steps: int) -> float:
        """Mean wall time per optimizer step after `skip_steps`, from this process's clock on the lines as they arrive:
        what a user pays, periodic costs (logging, progress, anything every N steps) included."""
        steps = sorted(step for step in self.step_seen_s if step > skip_steps)
        if len(steps) < 2:
            raise RuntimeError(f"fewer than two step lines after step {skip_steps}: {' '.join(self.command)}")
        return (self.step_seen_s[steps[-1]] - self.step_seen_s[steps[0]]) / (steps[-1] - steps[0])

    def steady_tokens_per_s(self, skip_steps: int) -> float:
        """Median throughput over the windows after `skip_steps` (warm-up excluded)."""
        if self.step_clock:  # a baseline: windows of 10 steps from its own per-step clock
            steps = sorted(s for s in self.step_clock if s > skip_steps)
            windows = [steps[i:i + 10] for i in range(1, len(steps) - 9, 10)]
            rates = [sum(self.step_clock[s][1] for s in w) / (self.step_clock[w[-1]][0] - self.step_clock[w[0] - 1][0])
                     for w in windows if w[0] - 1 in self.step_clock]
        else:
            rates = [rate for step, rate in self.step_tokens_per_s.items() if step > skip_steps + 1]
        if not rates:
            raise RuntimeError(f"no steady-state window after step {skip_steps}: {' '.join(self.command)}")
        return statistics.median(rates)


def run_timed(command: list[str], env: dict | None = None, timeout_s: float = 1800) -> Timed:
    timed = Timed(command)
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    for line in process.stdout:
        now = time.monotonic() - started
        timed.output.append(line.rstrip())
        timed.output_s.append(now)
        if match := _ORCHESTRATOR_STEP.search(line):
            step = int(match[1])
            timed.step_seen_s.setdefault(step, now)
            timed.step_tokens_per_s[step] = float(match[3].replace(",", ""))
        elif match := _BASELINE_STEP.match(line.strip()):
            step = int(match[1])
            timed.step_seen_s.setdefault(step, now)
            timed.step_clock[step] = (float(match[2]), int(match[3]))
        elif match := _FIRST_STEP.search(line):
            timed.step_seen_s.setdefault(int(match[1]), now)
        elif match := _CHECKPOINT.search(line):
            timed.checkpoint_blocked_s.append(float(match[1]))
        if now > timeout_s:
            process.kill()
    timed.returncode = process.wait()
    timed.exit_s = time.monotonic() - started
    if timed.returncode != 0 or not timed.step_seen_s:
        tail = "\n".join(timed.output[-40:])
        raise RuntimeError(f"{' '.join(command)} exited {timed.returncode}:\n{tail}")
    return timed


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
