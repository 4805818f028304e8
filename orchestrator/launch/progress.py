"""Console progress on the driver, fed by rank 0 through a Ray queue: steps, loss, tokens/s, ETA."""

from __future__ import annotations

import queue as queue_lib
import threading
from datetime import timedelta
from typing import Callable, Optional


def format_event(event: dict) -> str | None:
    kind = event.get("event")
    if kind == "start":
        return (f"model ready: {event['counts']} | data: {event['train_examples']} train / "
                f"{event['eval_examples']} eval examples")
    if kind == "step":
        done_here = event["step"] - event["start_step"]
        remaining = event["max_steps"] - event["step"]
        eta = timedelta(seconds=round(event["elapsed"] / done_here * remaining)) if done_here else "?"
        line = (f"step {event['step']:>6}/{event['max_steps']} | loss {event['loss']:.4f}"
                + (f" | eval_loss {event['eval_loss']:.4f}" if "eval_loss" in event else "")
                + f" | {event['tokens_per_s']:,.0f} tok/s | lr {_rates(event)} | ETA {eta}")
        return line
    if kind == "first_step":
        return f"step {event['step']} done ({event['worker_s']:.1f} s after the worker started)"
    if kind == "checkpoint":
        blocked = f" (blocked {event['blocked_s']:.2f} s)" if "blocked_s" in event else ""
        return f"checkpoint saved: {event['uri']}{blocked}"
    if kind == "stopped":
        return f"stopped after step {event['step']}, its checkpoint stored"
    if kind == "done":
        return f"final adapter: {event['adapter_uri']}"
    if kind == "restarting":  # from launch/failures.py's WorkerWatch, with the checkpoint the driver found
        where = f" on {event['host']}" if "host" in event else ""
        start = f"checkpoint step {event['checkpoint']}" if event.get("checkpoint") else "the start (no complete checkpoint yet)"
        return f"worker rank {event['rank']}{where} failed: {event['cause']}; restarting from {start}"
    return None


_END = {"event": "end of progress"}


def on_the_driver_node():
    """Where the driver's own actors go: its node, which lives as long as the run does. Placed by Ray's default they
    may land on a worker node, and die with it when that node is lost (the multi-node test saw the queue go)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


class ProgressPrinter:
    """A Ray queue the workers write to and a driver thread that prints it."""

    def __init__(self, echo, newest_checkpoint: Callable[[], Optional[int]] = lambda: None):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_the_driver_node()})
        self.echo = echo
        self.newest_checkpoint = newest_checkpoint  # the step a restarted worker group resumes from
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                # Long: the end comes as _END, and each empty read is an RPC to the queue's actor.
                event = self.queue.get(timeout=5)
            except (queue_lib.Empty, Exception):  # Exception: the queue's actor is gone
                if self._stop.is_set():
                    return
                continue
            if event == _END:
                return
            self.events.append(event)
            if event.get("event") == "restarting":
                event["checkpoint"] = self.newest_checkpoint()
            line = format_event(event)
            if line:
                self.echo(line)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        try:  # after the workers' events, so the thread prints them all and returns without a last timeout
            self.queue.put_nowait(_END)
        except Exception:
            pass  # the thread stops at its next empty read
        self._thread.join(timeout=10)
        self.queue.shutdown(force=True)


def _rates(event: dict) -> str:
    if "lr_B" in event:
        return f"{event['lr']:.2e} (B {event['lr_B']:.2e})"
    return f"{event['lr']:.2e}"
