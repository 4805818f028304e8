"""HF datasets → tokenized examples → deterministic per-step batches (a pure function of the step, so resume is exact)."""

from __future__ import annotations

import os
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


def tokenize_records(records, tokenizer, spec: DataSpec):
    """Token ids and labels as a `datasets.Dataset` (rows: {"input_ids", "labels"}); with prompt+completion
    the loss covers only the completion (and EOS). Examples left with nothing to train on are dropped.

    Tokenized once: `datasets` caches the result beside the loaded data under a key made of the data's
    fingerprint, the tokenizer and the data fields, so a restart, a resume, another trial or another
    worker on the node reads it back (memory-mapped, shared through the page cache) instead of tokenizing.
    """
    import datasets
    from datasets.fingerprint import Hasher

    if isinstance(records, list):
        records = datasets.Dataset.from_list(records)
    fields = {"text_field": spec.text_field, "prompt_field": spec.prompt_field,
              "completion_field": spec.completion_field, "max_length": spec.max_length}
    # Given explicitly: hashing the function instead makes dill disassemble it onto a Ray worker's stdout.
    fingerprint = Hasher.hash([records._fingerprint, tokenizer, fields, _TOKENIZE_VERSION])
    examples = records.map(_tokenize_batch, batched=True, batch_size=1000, remove_columns=records.column_names,
                           features=_tokenized_features(), fn_kwargs={"tokenizer": tokenizer, **fields},
                           new_fingerprint=fingerprint)
    if len(examples) == 0:
        raise PreflightError(f"data.max_length: {spec.max_length} leaves no completion tokens to train on")
    return examples


_TOKENIZE_VERSION = 1  # part of the cache key: bump when _tokenize_batch changes what it produces


def _tokenize_batch(batch: dict[str, list], tokenizer, text_field, prompt_field, completion_field,
                    max_length: int) -> dict[str, list]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if text_field:
        ids = [row + eos for row in tokenizer([str(t) for t in batch[text_field]])["input_ids"]]
        labels = [list(row) for row in ids]
    else:
        prompts = tokenizer([str(t) for t in batch[prompt_field]])["input_ids"]
        completions = tokenizer([str(t) for t in batch[completion_field]], add_special_tokens=False)["input_ids"]
        ids = [prompt + completion + eos for prompt, completion in zip(prompts, completions)]
        labels = [[IGNORE_INDEX] * len(prompt) + completion + eos for prompt, completion in zip(prompts, completions)]
    kept: dict[str, list] = {"input_ids": [], "labels": []}
    for row_ids, row_labels in zip(ids, labels):
        row_ids, row_labels = row_ids[:max_length], row_labels[:max_length]
        if any(label != IGNORE_INDEX for label in row_labels[1:]):
            kept["input_ids"].append(row_ids)
            kept["labels"].append(row_labels)
    return kept


def _tokenized_features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids})


def split_train_eval(examples, eval_fraction: float, seed: int):
    """A seeded split of a tokenized dataset into (train, eval); index views, nothing is copied."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    eval_count = int(len(examples) * eval_fraction)
    if eval_fraction > 0 and len(examples) > 1:
        eval_count = max(1, eval_count)
    eval_ids, train_ids = order[:eval_count], order[eval_count:]
    return examples.select(train_ids), examples.select(eval_ids)


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of a tokenized dataset → right-padded input_ids, labels and attention_mask."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
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


def eval_batches(examples, batch_size: int, max_batches: int, world_size: int, rank: int) -> list[list[dict]]:
    """Rank `rank`'s evaluation batches: every world_size-th example, at most `max_batches` batches.

    Every rank gets the same number of batches: under ZeRO-3 each forward is a collective (parameters
    are gathered layer by layer), so a rank with one batch fewer would leave the others waiting forever.
    A rank short of examples pads with rows that carry no labels: they run the forward and count nothing.
    """
    def share(r: int) -> range:
        return range(r, len(examples), world_size)[: batch_size * max_batches]

    batch_count = -(-len(share(0)) // batch_size)  # rank 0's share is the largest
    mine = [examples[i] for i in share(rank)]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if len(batches) < batch_count:
        filler = {"input_ids": examples[0]["input_ids"], "labels": [IGNORE_INDEX] * len(examples[0]["input_ids"])}
        batches += [[filler]] * (batch_count - len(batches))
    return batches
