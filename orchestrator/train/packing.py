"""Sequence packing: tokenized examples → rows of up to max_length tokens, each example keeping its own positions.

A packed row carries `position_ids` that restart at 0 for every example. Given those and no attention mask,
transformers builds a block-diagonal causal mask (eager and sdpa) or splits the row for flash-attention's
varlen kernel, so no token attends to another example; the forward must run with `use_cache=False`, since
with a cache transformers does not look for packed sequences. Each example's first label is ignored: it
would be the target of the previous example's last token.

Packing runs once, in the data cache step, in a fixed order: the packed rows are a dataset like any other,
and the sample schedule stays a pure function of the step.
"""

from __future__ import annotations

import bisect

from orchestrator.train.formats import IGNORE_INDEX

_WINDOW = 10_000  # examples packed together (best fit within a window: near-full rows, bounded work per batch)
_PACK_VERSION = 1  # part of the cache key: bump when pack_batch changes what it produces


def pack_examples(examples, max_length: int):
    """A `datasets.Dataset` of packed rows ({input_ids, labels, position_ids}) from one of examples; cached."""
    import datasets
    from datasets.fingerprint import Hasher

    ids = datasets.List(datasets.Value("int32"))
    fingerprint = Hasher.hash([examples._fingerprint, max_length, _PACK_VERSION])
    return examples.map(pack_batch, batched=True, batch_size=_WINDOW, remove_columns=examples.column_names,
                        features=datasets.Features({"input_ids": ids, "labels": ids, "position_ids": ids}),
                        fn_kwargs={"max_length": max_length}, new_fingerprint=fingerprint)


def pack_batch(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Best-fit decreasing: longest example first, each into the fullest row it still fits (ties: the oldest
    row), so rows come out nearly full whatever the order of the examples."""
    lengths = [len(ids) for ids in batch["input_ids"]]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted
    for example in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[example], -1))
        if at == len(free):
            rows.append([example])
            bisect.insort(free, (max_length - lengths[example], len(rows) - 1))
            continue
        space, row = free.pop(at)
        rows[row].append(example)
        bisect.insort(free, (space - lengths[example], row))
    packed: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in rows:
        input_ids, labels, positions = [], [], []
        for example in members:
            input_ids += batch["input_ids"][example]
            labels += [IGNORE_INDEX] + list(batch["labels"][example][1:])
            positions += range(lengths[example])
        packed["input_ids"].append(input_ids)
        packed["labels"].append(labels)
        packed["position_ids"].append(positions)
    return packed
