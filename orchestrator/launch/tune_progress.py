"""Console progress of a search on the driver: one line per trial event, with the best result so far."""

from __future__ import annotations

from ray import tune

from orchestrator.results.text import sampled_values

# Tune pickles its callbacks with the search state and restores them on --resume: the callback must
# not hold the console itself, or a resumed search would print into the previous session's sink.
_sink = [print]


def set_sink(echo) -> None:
    _sink[0] = echo


class SearchProgress(tune.Callback):
    def __init__(self, keys: dict[str, str], metric: str, mode: str, max_steps: int):
        self.keys, self.metric, self.mode, self.max_steps = keys, metric, mode, max_steps
        self.best: tuple[float, str] | None = None

    def echo(self, line: str) -> None:
        _sink[0](line)

    def _params(self, trial) -> str:
        return sampled_values({self.keys.get(k, k): v for k, v in (trial.config or {}).items()})

    def _counts(self, trials) -> str:
        statuses = [t.status for t in trials]
        return (f"{statuses.count('RUNNING')} running, {statuses.count('TERMINATED')} done, "
                f"{statuses.count('PENDING')} waiting, {statuses.count('ERROR')} failed")

    def on_trial_start(self, iteration, trials, trial, **info):
        # A trial HyperBand paused, or PBT restarted from another trial's checkpoint, starts again from a checkpoint.
        again = trial.checkpoint is not None
        self.echo(f"trial {trial.trial_id} {'continues from a checkpoint' if again else 'started'}: {self._params(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None:
            return
        better = self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0])
        if better:
            self.best = (value, trial.trial_id)
        self.echo(f"trial {trial.trial_id} step {result.get('step', '?')}/{self.max_steps}: {self.metric} {value:.4f} | "
                  f"best {self.best[0]:.4f} ({self.best[1]}) | {self._counts(trials)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        how = "finished" if step >= self.max_steps else f"stopped early at step {step}"
        self.echo(f"trial {trial.trial_id} {how} | {self._counts(trials)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        from orchestrator.launch.failures import trial_failure

        self.echo(f"trial {trial.trial_id} failed: {trial_failure(trial)} | {self._counts(trials)}")
