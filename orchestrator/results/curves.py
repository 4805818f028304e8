"""Loss curves as PNG bytes (matplotlib, Agg backend: no display needed): one run, or several side by side."""

from __future__ import annotations

import io
from typing import Any, Sequence

# Pixel sizes are figure inches × DPI; tests check them, so the figure is saved without a tight bbox.
DPI = 100
RUN_FIGURE_INCHES = (8, 5)
COMPARISON_FIGURE_INCHES = (12, 5)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and "step" in m]
    return ([step for step, _ in points], [value for _, value in points])


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(figure)
    return buffer.getvalue()


def run_curves_png(title: str, metrics: list[dict[str, Any]]) -> bytes:
    """Train loss at every logged step and eval loss at every evaluation, on one axis."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=RUN_FIGURE_INCHES, dpi=DPI)
    for key, style in (("loss", {"linewidth": 1.2}), ("eval_loss", {"marker": "o", "linewidth": 1.8})):
        steps, values = _series(metrics, key)
        if steps:
            axes.plot(steps, values, label=key, **style)
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=axes.transAxes)
    return _png(figure)


def comparison_png(title: str, runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> bytes:
    """Train loss (left) and eval loss (right) of several runs, one colour per run in both panels."""
    plt = _pyplot()
    figure, (train_axes, eval_axes) = plt.subplots(1, 2, figsize=COMPARISON_FIGURE_INCHES, dpi=DPI, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, metrics) in enumerate(runs):
        colour = colours[index % len(colours)]
        for axes, key, style in ((train_axes, "loss", {}), (eval_axes, "eval_loss", {"marker": "o"})):
            steps, values = _series(metrics, key)
            if steps:
                axes.plot(steps, values, color=colour, label=label, **style)
    train_axes.set(xlabel="step", ylabel="train loss", title="train loss")
    eval_axes.set(xlabel="step", ylabel="eval loss", title="eval loss")
    for axes in (train_axes, eval_axes):
        axes.grid(alpha=0.3)
    if eval_axes.lines or train_axes.lines:
        (eval_axes if eval_axes.lines else train_axes).legend(fontsize=7)
    figure.suptitle(title)
    return _png(figure)


def history_png(title: str, ylabel: str, series: Sequence[tuple[str, list[tuple[int, float]]]]) -> bytes:
    """One metric of several runs, (step, value) points each, on one axis (a search's published curves.png)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=RUN_FIGURE_INCHES, dpi=DPI)
    for label, points in series:
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o", label=label)
    axes.set(xlabel="step", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=7)
    return _png(figure)
