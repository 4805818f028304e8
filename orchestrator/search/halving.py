"""Synchronous successive halving (`tune.scheduler.type: sha`): one bracket holding every trial of the search.

Every trial trains to the first rung (grace_period steps) and pauses there; when all have, the best
1/reduction_factor continue from their own checkpoints to the next rung (× reduction_factor), and so on until
max_steps. Unlike ASHA, no trial is let through a rung because it arrived before the trials that beat it: the cuts
depend on the trials' results only, not on the order or the speed at which they ran.

Ray Tune's HyperBand already runs a synchronous bracket (pausing, continuing, stopping); this keeps its machinery
and replaces only how brackets are sized: one bracket of all trials, starting at the grace period, instead of
HyperBand's series of brackets from max_t downwards.
"""

from __future__ import annotations

from ray.tune.schedulers.hyperband import HyperBandScheduler, _Bracket


def halving_rungs(grace_period: int, reduction_factor: float, max_steps: int) -> tuple[int, ...]:
    """The steps at which the bracket cuts, in the bracket's own arithmetic (`_Bracket.successive_halving`:
    r ← int(min(r × η, max_t))), so that a trial checkpoints exactly where Tune decides."""
    rungs, step = [], grace_period
    while step < max_steps:
        rungs.append(step)
        step = int(min(step * reduction_factor, max_steps))
    return tuple(rungs)


class SuccessiveHalving(HyperBandScheduler):
    """HyperBand with a single bracket of `trials` trials whose first rung is `grace_period` steps."""

    def __init__(self, *, trials: int, grace_period: int, reduction_factor: float, max_t: int, time_attr: str):
        super().__init__(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor)
        self._trials, self._grace_period = trials, grace_period
        self._cuts = len(halving_rungs(grace_period, reduction_factor, max_t))

    def _create_bracket(self, s: int) -> _Bracket:
        # A search with more trials than announced (a resumed one) opens another bracket of the same shape.
        return _Bracket(time_attr=self._time_attr, max_trials=self._trials, init_t_attr=self._grace_period,
                        max_t_attr=self._max_t_attr, eta=self._eta, s=self._cuts, stop_last_trials=self._stop_last_trials)
