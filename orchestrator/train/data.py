"""HF datasets → tokenized examples → deterministic per-step batches (a pure function of the step, so resume is exact)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.errors import PreflightError
from orchestrator.spec import DataSpec

IGNORE_INDEX = -100
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _storage_options(path: str) -> dict[str, Any] | None:
    if not path.startswith("s3://"):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if endpoint else {}


def load_records(path: str):
    """Load a dataset (file, saved dataset directory, or s3:// path) as one `datasets.Dataset`."""
    import datasets

    datasets.disable_progress_bars()
    options = _storage_options(path)
    local = path if options is None else None
    if local is not None and not os.path.exists(local):
        raise PreflightError(f"data.path: {path} does not exist")
    if local is not None and os.path.isfile(local) and os.path.getsize(local) == 0:
        raise PreflightError(f"data.path: {path} is empty")
    try:
        if local is not None and os.path.isdir(local):
            loaded = datasets.load_from_disk(local)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            return loaded
        suffix = next((s for s in _FORMATS if path.endswith(s)), None)
        if suffix is None:
            raise PreflightError(f"data.path: {path}: unknown format (use .jsonl, .json, .parquet, .csv or a saved dataset directory)")
        return datasets.load_dataset(_FORMATS[suffix], data_files=path, split="train", storage_options=options)
    except PreflightError:
        raise
    except Exception as error:  # datasets raises many types for unreadable files
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PreflightError(f"data.path: cannot read {path}: {first_line}") from None


def check_fields(records, spec: DataSpec, path: str) -> None:
    needed = [spec.text_field] if spec.text_field else [spec.prompt_field, spec.completion_field]
    field_names = ["text_field"] if spec.text_field else ["prompt_field", "completion_field"]
    for field_name, column in zip(field_names, needed):
        if column not in records.column_names:
            raise PreflightError(
                f"data.{field_name}: {column!r} is not a column of {path} (columns: {', '.join(records.column_names)})"
            )
    if len(records) == 0:
        raise PreflightError(f"data.path: {path} holds no examples")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_records(records, tokenizer, spec: DataSpec) -> list[Example]:
    """Token ids and labels; with prompt+completion the loss covers only the completion (and EOS)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for record in records:
        if spec.text_field:
            ids = tokenizer(str(record[spec.text_field]))["input_ids"] + eos
            labels = list(ids)
        else:
            prompt = tokenizer(str(record[spec.prompt_field]))["input_ids"]
            completion = tokenizer(str(record[spec.completion_field]), add_special_tokens=False)["input_ids"] + eos
            ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
        ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append(Example(ids, labels))
    if not examples:
        raise PreflightError(f"data.max_length: {spec.max_length} leaves no completion tokens to train on")
    return examples


def split_train_eval(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    eval_count = int(len(examples) * eval_fraction)
    if eval_fraction > 0 and len(examples) > 1:
        eval_count = max(1, eval_count)
    eval_ids, train_ids = order[:eval_count], order[eval_count:]
    return [examples[i] for i in train_ids], [examples[i] for i in eval_ids]


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class BatchSchedule:
    """Which examples rank r sees at micro-step m of optimizer step s: epochs of seeded permutations.

    Position p = ((s·grad_accum + m)·world + r)·batch + i in an endless stream of epochs, so any
    step's batch is known without replaying the ones before it.
    """

    def __init__(self, size: int, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int):
        self.size, self.batch_size, self.grad_accum = size, batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            # A batch spans at most two epochs: keep the current and previous permutation only.
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = torch.randperm(self.size, generator=generator).tolist()
        return self._permutations[epoch]

    def indices(self, step: int, micro_step: int) -> list[int]:
        start = ((step * self.grad_accum + micro_step) * self.world_size + self.rank) * self.batch_size
        return [self._permutation(p // self.size)[p % self.size] for p in range(start, start + self.batch_size)]

    def epoch(self, step: int) -> float:
        return step * self.grad_accum * self.world_size * self.batch_size / self.size


def eval_batches(examples: list[Example], batch_size: int, max_batches: int, world_size: int, rank: int):
    mine = examples[rank::world_size][: batch_size * max_batches]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
