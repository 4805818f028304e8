"""Ctrl-C and SIGTERM during training: the first asks the workers to checkpoint the step they are on and stop
(train/control.py), and the command exits with code 3; a second one stops at once (the last complete checkpoint is
kept, as after any failure)."""

from __future__ import annotations

import asyncio
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from orchestrator.errors import OrchestratorError


class Stopped(OrchestratorError):
    """Training stopped on request, after its checkpoint was stored: `--resume` goes on with no step lost."""

    exit_code = 3
    label = "stopped"


class StopRequest:
    """Driver side: a Ray actor (num_cpus=0, asynchronous) that rank 0 reads (train/control.py's StepBoundary).
    Defined here, not beside its reader: its process imports this module, which imports no torch (2.7 s a run)."""

    def __init__(self) -> None:
        self._asked: Optional[asyncio.Event] = None  # made in the actor's event loop, at its first call

    def _event(self) -> asyncio.Event:
        if self._asked is None:
            self._asked = asyncio.Event()
        return self._asked

    async def ask(self) -> None:
        self._event().set()

    async def asked(self, wait_s: float = 0.0) -> bool:
        """Whether a stop was asked, waiting up to `wait_s` seconds for one."""
        event = self._event()
        if not event.is_set() and wait_s > 0:
            try:
                await asyncio.wait_for(event.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return event.is_set()


@contextmanager
def stop_on_signal(echo: Callable[[str], None]) -> Iterator[tuple[object, threading.Event]]:
    """(the StopRequest actor for the workers' config, set once a stop was asked). Signal handlers need the
    main thread: elsewhere (a notebook's worker thread) only a second-hand stop is possible, and none is set."""
    import ray

    from orchestrator.launch.progress import on_the_driver_node

    request = ray.remote(StopRequest).options(num_cpus=0, scheduling_strategy=on_the_driver_node()).remote()
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield request, asked
        return

    def handle(signum, _frame) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()
        request.ask.remote()
        echo(f"{signal.Signals(signum).name}: checkpointing the current step, then stopping "
             "(again to stop at once, keeping the last complete checkpoint)")

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request, asked
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
