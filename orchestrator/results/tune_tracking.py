"""Ray Tune's MLflow logger for a search, imported only when the spec asks for MLflow (see orchestrator.results.tracking)."""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL


class SearchMLflowLogger(MLflowLoggerCallback):
    """Ray's logger, with two changes: MLflow's step is the optimizer step (Ray's default is the count
    of reports, which here happen only at evaluations and checkpoints), and the sampled values are also
    logged under their dotted spec paths (`adapter.r`), not only under Tune's names for them (`p0`)."""

    def __init__(self, keys: dict[str, str], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys = keys

    def log_trial_start(self, trial):
        super().log_trial_start(trial)
        named = {self.keys.get(name, name): value for name, value in (trial.config or {}).items()}
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=named)

    def log_trial_result(self, iteration: int, trial, result: dict):
        step = result.get("step")
        super().log_trial_result(iteration, trial, result if step is None else {**result, TIMESTEPS_TOTAL: step})
