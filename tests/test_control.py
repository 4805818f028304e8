"""The step-boundary agreement of train/control.py on one rank: a stop once asked, a preemption checkpoint once per
notice. (Two ranks agreeing, a real Ctrl-C and a real spot notice: tests/test_faults.py, tests/test_multinode.py.)"""

from __future__ import annotations

from orchestrator.launch.stopping import StopRequest
from orchestrator.train import control


def test_a_stop_is_seen_at_the_next_boundary_and_a_notice_checkpoints_once(monkeypatch):
    noticed = [False]
    monkeypatch.setattr(control, "_preemption_noticed", lambda: noticed[0])
    boundary = control.StepBoundary(None, rank=0, world=1)
    assert boundary.agree() == (False, False)
    noticed[0] = True
    assert boundary.agree() == (False, True)   # checkpoint now
    assert boundary.agree() == (False, False)  # and not again for the same notice
    boundary._asked.set()
    assert boundary.agree() == (True, False)


def test_outside_ray_train_no_notice_is_seen():
    assert control._preemption_noticed() is False


def test_the_stop_requests_process_imports_no_torch():
    # Its actor process imports the class's own module on every run's way to the first step: torch would take 2.7 s.
    import subprocess
    import sys

    probe = ("import importlib, sys; from orchestrator.launch.stopping import StopRequest; "
             "importlib.import_module(StopRequest.__module__); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_rank_zero_hears_a_stop_at_once_while_asking_the_driver_rarely(ray_session):
    """The watch is a long poll of the driver's actor: one call per WAIT_S, answered as soon as a stop is asked
    (a 0.5 s poll, as before, made two calls a second)."""
    import time

    import ray

    class CountingStopRequest(StopRequest):  # defined here: Ray sends it to the actor by value
        def __init__(self) -> None:
            super().__init__()
            self.reads = 0

        async def asked(self, wait_s: float = 0.0) -> bool:
            self.reads += 1
            return await super().asked(wait_s)

        async def read_count(self) -> int:
            return self.reads

    request = ray.remote(CountingStopRequest).options(num_cpus=0).remote()
    assert ray.get(request.asked.remote(0.2)) is False  # waits, then answers
    boundary = control.StepBoundary(request, rank=0, world=1)
    time.sleep(1.5)
    assert boundary.agree() == (False, False)
    assert ray.get(request.read_count.remote()) == 2  # the call above and the watch's one pending read
    asked_at = time.monotonic()
    ray.get(request.ask.remote())
    assert boundary._asked.wait(5), "the pending read returns when the stop is asked"
    assert time.monotonic() - asked_at < 2
    assert boundary.agree() == (True, False)
