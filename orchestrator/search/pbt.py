"""`tune.scheduler.type: pbt`: Ray Tune's population based training, with no exploitation at a run's last step."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler


class PopulationBasedTrainingWithinRuns(PopulationBasedTraining):
    """Ray's PBT, except that a result at max_steps neither exploits nor is kept as a checkpoint to exploit. A trial
    that copied a finished trial's last checkpoint would have nothing left to train: it would only show the other
    trial's result as its own, in place of the one it trained to."""

    def __init__(self, *, max_t: int, **options: Any):
        super().__init__(**options)
        self._max_t = max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
