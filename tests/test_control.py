"""The step-boundary agreement of train/control.py on one rank: a stop once asked, a preemption checkpoint once per
notice. (Two ranks agreeing, a real Ctrl-C and a real spot notice: tests/test_faults.py, tests/test_multinode.py.)"""

from __future__ import annotations

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
