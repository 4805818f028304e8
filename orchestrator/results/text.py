"""Results as short text for a terminal or a table: a value at 3 significant digits, a trial's sampled values."""

from __future__ import annotations

from typing import Any, Mapping


def short(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def sampled_values(params: Mapping[str, Any]) -> str:
    """`adapter.r=16, optim.lr=0.003`: what a search sampled for one trial."""
    return ", ".join(f"{key}={short(value)}" for key, value in params.items())
