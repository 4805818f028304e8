"""Data for the workers: usable rows (train/formats.py) → token ids and labels → packed rows (data.packing) →
deterministic per-step batches (a pure function of the step, so resume is exact).

Every stage is computed once per node and kept in the `datasets` cache (HF_DATASETS_CACHE) under a key made of
what determines it: the data's content, the tokenizer, the chat template and the `data` fields that change the
result. A restart, a resume, another trial or another worker on the node reads it back, memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from orchestrator.errors import PreflightError
from orchestrator.spec import DataSpec, JobSpec
from orchestrator.train import chat, packing
from orchestrator.train.formats import (
    IGNORE_INDEX, DataCheck, Layout, RowRule, detect_layout, first_columns, usable_rows,
)
from orchestrator.train.sources import Source, open_source

_ROWS_VERSION = 1      # part of the usable-rows cache key: bump when formats.RowRule changes what it produces
_TOKENIZE_VERSION = 2  # part of the tokenized cache key: bump when _tokenize_batch changes what it produces


@dataclass
class DataReport:
    """What a worker's data came to, for the run's summary."""

    rows: int             # usable rows of data.path (and data.eval_path)
    empty: int            # of those, left without a token to train on within max_length (dropped)
    train_examples: int
    eval_examples: int
    train_rows: int       # rows of train_examples the sample schedule draws from: fewer when packed
    packed: bool


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset of {input_ids, labels} (+ position_ids when packed)
    eval: Any
    report: DataReport


def prepare_data(spec: JobSpec, data_path: str, eval_data_path: Optional[str], tokenizer) -> PreparedData:
    """The training and evaluation sets of a run, each stage cached (see the module's docstring)."""
    rows = read_rows(data_path, spec.data, "data.path", tokenizer)
    examples = tokenize_records(rows, tokenizer, spec.data)
    read = [(rows, examples)]
    if eval_data_path:
        eval_rows = read_rows(eval_data_path, spec.data, "data.eval_path", tokenizer)
        train, evaluation = examples, tokenize_records(eval_rows, tokenizer, spec.data)
        read.append((eval_rows, evaluation))
    else:
        train, evaluation = split_train_eval(examples, spec.data.eval_fraction, spec.train.seed)
    examples_count = len(train)
    if spec.data.packing:
        train = packing.pack_examples(train, spec.data.max_length)
    report = DataReport(rows=sum(len(r) for r, _ in read), empty=sum(len(r) - len(e) for r, e in read),
                        train_examples=examples_count, eval_examples=len(evaluation), train_rows=len(train),
                        packed=spec.data.packing)
    return PreparedData(train, evaluation, report)


def row_rule(source: Source, spec: DataSpec, where: str, tokenizer: Callable[[], Any]) -> tuple[RowRule, Optional[str]]:
    """The rule the rows of `source` must meet, and the chat template for chat formats (None for others);
    `tokenizer()` gives the tokenizer, loaded only for chat formats."""
    layout = detect_layout(spec, first_columns(source), where, source.path)
    if layout.shape != "chat":
        return RowRule(layout, spec.train_on, None), None
    loaded = tokenizer()
    template = chat.template_text(spec.chat_template, loaded, loaded.name_or_path)
    # The template is tried on each new sequence of roles, so that a row it fails on is a bad row like any other.
    return RowRule(layout, spec.train_on, chat.TemplateCheck(chat.renderer(loaded, template), spec.train_on)), template


def check_rows(path: str, spec: DataSpec, where: str, tokenizer: Callable[[], Any]) -> DataCheck:
    """Read every row of `path` through the row rule, writing nothing (preflight): stops at the first bad row
    with one line naming it, or with data.bad_rows: skip counts them."""
    source = open_source(path, spec, where)
    rule, _ = row_rule(source, spec, where, tokenizer)
    check = DataCheck()
    for _ in usable_rows(source, rule, spec.bad_rows, where, check):
        pass
    return check


def read_rows(path: str, spec: DataSpec, where: str, tokenizer):
    """The usable rows of `path` in canonical form ({row, text | prompt, completion | messages}), as a cached
    `datasets.Dataset`. Preflight has counted what data.bad_rows: skip leaves out."""
    import datasets
    from datasets.exceptions import DatasetGenerationError
    from datasets.fingerprint import Hasher

    datasets.disable_progress_bars()
    source = open_source(path, spec, where)
    rule, template = row_rule(source, spec, where, lambda: tokenizer)
    layout = rule.layout
    fingerprint = Hasher.hash([source.fingerprint, layout.format, layout.fields, spec.train_on, spec.bad_rows,
                               template, tokenizer_key(tokenizer) if template else None, _ROWS_VERSION])
    try:
        return datasets.Dataset.from_generator(lambda: usable_rows(source, rule, spec.bad_rows, where, DataCheck()),
                                               features=_row_features(layout), fingerprint=fingerprint)
    except DatasetGenerationError as error:  # datasets wraps what the generator raised
        if isinstance(error.__cause__, PreflightError):
            raise error.__cause__ from None
        raise


def _row_features(layout: Layout):
    import datasets

    text = datasets.Value("string")
    columns = {"text": {"text": text}, "prompt_completion": {"prompt": text, "completion": text},
               "chat": {"messages": datasets.List({"role": text, "content": text})}}[layout.shape]
    return datasets.Features({"row": datasets.Value("int64"), **columns})


def tokenize_records(records, tokenizer, spec: DataSpec):
    """Token ids and labels of usable rows (read_rows; a list of such dicts in tests) as a `datasets.Dataset` of
    {"input_ids", "labels"}: the loss covers what data.train_on says. Rows left with nothing to train on within
    max_length are dropped. Cached (module docstring)."""
    import datasets
    from datasets.fingerprint import Hasher

    if isinstance(records, list):
        records = datasets.Dataset.from_list(records)
    columns = records.column_names
    shape = "chat" if "messages" in columns else ("prompt_completion" if "completion" in columns else "text")
    template = chat.template_text(spec.chat_template, tokenizer, tokenizer.name_or_path) if shape == "chat" else None
    fields = {"shape": shape, "train_on": spec.train_on, "max_length": spec.max_length, "template": template}
    # Given explicitly: hashing the function instead makes dill disassemble it onto a Ray worker's stdout.
    fingerprint = Hasher.hash([records._fingerprint, tokenizer_key(tokenizer), fields, _TOKENIZE_VERSION])
    examples = records.map(_tokenize_batch, batched=True, batch_size=1000, remove_columns=records.column_names,
                           features=_tokenized_features(), fn_kwargs={"tokenizer": tokenizer, **fields},
                           new_fingerprint=fingerprint)
    if len(examples) == 0:
        raise PreflightError(f"data.max_length: {spec.max_length} leaves no tokens to train on in any row")
    return examples


def tokenizer_key(tokenizer) -> str:
    """What a tokenizer's token ids depend on, not where it was loaded from: the same tokenizer beside two models (an
    8B and a 70B of one family, a base and its instruct version) keys the same cached tokens, where the object as
    pickled differs by its paths. A fast tokenizer is its whole definition (vocabulary, normalizer, pre-tokenizer,
    post-processor, added tokens) as JSON, with the special tokens and settings the Python side adds; any other is
    hashed as pickled."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        definition = backend.to_str() if backend is not None else None
    except Exception:  # a custom (Python) pre-tokenizer or normalizer cannot be serialized
        definition = None
    if definition is None:
        return Hasher.hash(tokenizer)
    return Hasher.hash([type(tokenizer).__name__, definition, tokenizer.special_tokens_map,
                        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        getattr(tokenizer, "split_special_tokens", None)])


def _tokenize_batch(batch: dict[str, list], tokenizer, shape: str, train_on: str, max_length: int,
                    template: Optional[str]) -> dict[str, list]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if shape == "chat":
        rows = batch.get("row") or [0] * len(batch["messages"])
        ids, labels = chat.tokenize_conversations(batch["messages"], rows, tokenizer, chat.renderer(tokenizer, template),
                                                  train_on, "data")
    elif shape == "text":
        ids = [row + eos for row in tokenizer(batch["text"])["input_ids"]]
        labels = [list(row) for row in ids]
    else:
        prompts = tokenizer(batch["prompt"])["input_ids"]
        completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
        ids = [prompt + completion + eos for prompt, completion in zip(prompts, completions)]
        labels = [(list(prompt) if train_on == "all" else [IGNORE_INDEX] * len(prompt)) + completion + eos
                  for prompt, completion in zip(prompts, completions)]
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
    """Rows of a tokenized dataset → right-padded input_ids and labels, with attention_mask, or for packed rows
    position_ids (restarting at each example, padding counted as one more) and no mask: transformers then
    keeps examples apart (train/packing.py). Either way the padding carries no labels."""
    width = max(len(e["input_ids"]) for e in examples)
    packed = "position_ids" in examples[0]
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.arange(width).repeat(len(examples), 1) if packed else torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        if packed:
            extra[row, :length] = torch.tensor(example["position_ids"])
            extra[row, length:] = torch.arange(width - length)
        else:
            extra[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


def real_tokens(examples: list[dict]) -> int:
    """Tokens in a batch's rows, padding left out (the throughput the loop reports)."""
    return sum(len(example["input_ids"]) for example in examples)


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
