"""The global batch of a run and how any worker count splits it: what lets a run resume on another worker count and
train on with fewer workers (scaling.min_workers) taking the same optimizer steps.

A step trains on samples [step·G, (step+1)·G) of the run's sample stream (train/data.py's BatchSchedule), whatever
the worker count; when each worker keeps its per-worker batch and only grad_accum changes, even the micro-batches
are the same, and the steps differ only by the order in which gradients are summed.
"""

from __future__ import annotations


def global_batch(batch_size: int, grad_accum: int, workers: int) -> int:
    return batch_size * grad_accum * workers


def split_global_batch(total: int, workers: int, batch_size: int) -> tuple[int, int] | None:
    """(per-worker batch, grad_accum) with batch × grad_accum × workers == total: the preferred per-worker
    batch when it divides the worker's share, else the largest that does. None when `workers` cannot share
    `total` evenly."""
    if total % workers:
        return None
    share = total // workers
    batch = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return batch, share // batch


def uneven_worker_counts(total: int, low: int, high: int) -> list[int]:
    """The worker counts from `low` to `high` that cannot share `total` evenly."""
    return [n for n in range(low, high + 1) if total % n]


def uneven_counts_message(total: int, counts: list[int]) -> str:
    fitting = [n for n in range(1, max(8, 2 * max(counts)) + 1) if total % n == 0]
    shown = ", ".join(str(n) for n in counts)
    return (f"the global batch {total} (batch_size × grad_accum × num_workers) cannot be split evenly over "
            f"{shown} worker{'s' if counts != [1] else ''}; worker counts that keep it: {', '.join(map(str, fitting))}")
