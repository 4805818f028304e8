"""Data: every supported format loads, the loss covers only completions, batches are a pure function of the step."""

from __future__ import annotations

import json

import pytest

from orchestrator.errors import PreflightError
from orchestrator.spec import DataSpec
from orchestrator.train.data import (
    IGNORE_INDEX, BatchSchedule, check_fields, collate, eval_batches, load_records, tokenize_records,
)

ROWS = [{"prompt": f"{i}+1=", "completion": str(i + 1), "text": f"count {i}"} for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer():
    from orchestrator.builtin.models import build_tokenizer

    return build_tokenizer()


def _write(kind: str, directory):
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        path = directory / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "parquet":
        path = directory / "d.parquet"
        table.to_parquet(str(path))
    elif kind == "csv":
        path = directory / "d.csv"
        table.to_csv(str(path), index=False)
    else:
        path = directory / "saved"
        table.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "saved"])
def test_every_format_loads(kind, tmp_path):
    records = load_records(_write(kind, tmp_path))
    assert len(records) == 20
    assert str(records[3]["completion"]) == "4"


def test_missing_field_and_file_are_named(tmp_path):
    path = _write("jsonl", tmp_path)
    with pytest.raises(PreflightError, match="data.prompt_field: 'question' is not a column"):
        check_fields(load_records(path), DataSpec(path=path, prompt_field="question"), path)
    with pytest.raises(PreflightError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_loss_covers_only_the_completion(tokenizer):
    examples = tokenize_records([{"prompt": "12+7=", "completion": "19"}], tokenizer, DataSpec(path="x", max_length=64))
    (example,) = examples
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "19</s>"
    assert example["input_ids"][0] == tokenizer.bos_token_id


def test_text_field_trains_on_everything(tokenizer):
    (example,) = tokenize_records([{"text": "hello"}], tokenizer, DataSpec(path="x", text_field="text"))
    assert example["labels"] == example["input_ids"]


def test_padding_is_ignored_by_the_loss(tokenizer):
    examples = tokenize_records(ROWS[:2] + [{"prompt": "100+100=", "completion": "200"}], tokenizer, DataSpec(path="x"))
    batch = collate(list(examples), tokenizer.pad_token_id)
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE_INDEX)).all()


def test_batches_are_disjoint_across_ranks_and_reproducible():
    ranks = [BatchSchedule(100, 4, 2, 2, rank, seed=3) for rank in range(2)]
    seen = [i for step in range(3) for micro in range(2) for schedule in ranks for i in schedule.indices(step, micro)]
    assert len(seen) == len(set(seen)) == 48
    fresh = BatchSchedule(100, 4, 2, 2, 1, seed=3)
    assert fresh.indices(2, 1) == ranks[1].indices(2, 1), "a resumed worker sees the same batch"
    wrapped = BatchSchedule(10, 4, 1, 1, 0, seed=0)
    first_epoch = [i for step in range(2) for i in wrapped.indices(step, 0)] + wrapped.indices(2, 0)[:2]
    assert sorted(first_epoch) == list(range(10))


@pytest.mark.parametrize("examples, batch_size, max_batches, world", [(9, 4, 8, 2), (1, 4, 8, 2), (10, 3, 2, 3), (7, 2, 8, 4), (8, 4, 8, 2)])
def test_every_rank_runs_the_same_number_of_eval_forwards(examples, batch_size, max_batches, world):
    """Under ZeRO-3 every forward is a collective: a rank with fewer eval batches would hang the others."""
    rows = [{"input_ids": [i, i + 1, i + 2], "labels": [i, i + 1, i + 2]} for i in range(examples)]
    per_rank = [eval_batches(rows, batch_size, max_batches, world, rank) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1, [len(b) for b in per_rank]
    assert all(0 < len(batch) <= batch_size for batches in per_rank for batch in batches)
    counted = [row["input_ids"][0] for batches in per_rank for batch in batches for row in batch
               if any(label != IGNORE_INDEX for label in row["labels"])]
    expected = [i for rank in range(world) for i in range(rank, examples, world)[: batch_size * max_batches]]
    assert sorted(counted) == sorted(expected)  # every real row once; padding rows carry no labels


def test_s3_data_path_loads_through_the_same_credentials(object_store, s3_storage_uri):
    from orchestrator.storage.fs import open_storage

    storage = open_storage(s3_storage_uri)
    storage.write_text(storage.path("data/train.jsonl"), "".join(json.dumps(r) + "\n" for r in ROWS))
    records = load_records(f"{s3_storage_uri}/data/train.jsonl")
    assert len(records) == 20 and records[0]["prompt"] == "0+1="


_TOKENIZE_IN_A_FRESH_PROCESS = """
import json, sys
from orchestrator.builtin.models import build_tokenizer
from orchestrator.spec import DataSpec
from orchestrator.train.data import load_records, tokenize_records
path, max_length = sys.argv[1], int(sys.argv[2])
examples = tokenize_records(load_records(path), build_tokenizer(), DataSpec(path=path, max_length=max_length))
print(json.dumps({"cache": examples.cache_files[0]["filename"], "first": examples[0]["input_ids"]}))
"""


def _tokenize_in_a_fresh_process(path: str, max_length: int, cache_dir) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_CACHE": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", _TOKENIZE_IN_A_FRESH_PROCESS, path, str(max_length)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # four fresh Python processes that each load the tokenizer: ~11 s
def test_tokenized_data_is_cached_across_processes_and_keyed_by_what_changes_it(tmp_path):
    """A restart, another trial or another worker reads the tokenized data back instead of tokenizing again;
    a different max_length or a rewritten data file must never read a stale cache."""
    import os

    path = _write("jsonl", tmp_path)
    cache_dir = tmp_path / "hf-cache"
    first = _tokenize_in_a_fresh_process(path, 512, cache_dir)
    written_at = os.stat(first["cache"]).st_mtime_ns
    again = _tokenize_in_a_fresh_process(path, 512, cache_dir)
    assert again == first and os.stat(first["cache"]).st_mtime_ns == written_at, "the second process re-tokenized"

    shorter = _tokenize_in_a_fresh_process(path, 6, cache_dir)
    assert shorter["cache"] != first["cache"] and len(shorter["first"]) == 6 < len(first["first"])

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({**r, "prompt": "x" + r["prompt"]}) + "\n" for r in ROWS))
    rewritten = _tokenize_in_a_fresh_process(path, 512, cache_dir)
    assert rewritten["cache"] != first["cache"] and rewritten["first"] != first["first"]


def test_examples_without_completion_tokens_are_dropped(tokenizer):
    rows = [{"prompt": "a long prompt that fills the window", "completion": "x"}, {"prompt": "1+1=", "completion": "2"}]
    (kept,) = tokenize_records(rows, tokenizer, DataSpec(path="x", max_length=12))
    assert tokenizer.decode(kept["input_ids"]).startswith("<s>1+1=")
    with pytest.raises(PreflightError, match="data.max_length: 3 leaves no completion tokens"):
        tokenize_records(rows, tokenizer, DataSpec(path="x", max_length=3))
