"""Hyperparameter search: the `tune:` section's space (space.py) and how a sampled point becomes a trial's
spec (trials.py). Pure (pydantic only, no Ray or torch at import): the spec validates its `tune`
section with `check_search`, and `orchestrator tune` builds each trial with `trial_raw`."""

from orchestrator.search.space import (
    SEARCHABLE_SECTIONS, Dimension, SchedulerSpec, TuneSpec, applies, split_key, trial_count,
)
from orchestrator.search.trials import check_search, trial_raw

__all__ = ["SEARCHABLE_SECTIONS", "Dimension", "SchedulerSpec", "TuneSpec", "applies", "check_search", "split_key",
           "trial_count", "trial_raw"]
