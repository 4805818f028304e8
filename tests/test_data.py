"""Data: every supported format loads, bad rows are named (or skipped, the same ones everywhere), the loss covers
only completions, batches are a pure function of the step. Chat data: test_chat_data.py; packing: test_packing.py."""

from __future__ import annotations

import json

import pytest

from orchestrator.errors import PreflightError
from orchestrator.spec import DataSpec
from orchestrator.train.data import (
    IGNORE_INDEX, BatchSchedule, check_rows, collate, eval_batches, read_rows, tokenize_records,
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
def test_every_format_loads(kind, tmp_path, tokenizer):
    records = read_rows(_write(kind, tmp_path), DataSpec(path="x"), "data.path", tokenizer)
    assert len(records) == 20
    assert records[3]["completion"] == "4" and records[3]["row"] == 4  # CSV's numbers read as their text


def test_missing_field_and_file_are_named(tmp_path, tokenizer):
    path = _write("jsonl", tmp_path)
    with pytest.raises(PreflightError, match="data.prompt_field: 'question' is not a column"):
        check_rows(path, DataSpec(path=path, prompt_field="question"), "data.path", lambda: tokenizer)
    with pytest.raises(PreflightError, match="does not exist"):
        check_rows(str(tmp_path / "nope.jsonl"), DataSpec(path="x"), "data.path", lambda: tokenizer)


def test_loss_covers_only_the_completion(tokenizer):
    examples = tokenize_records([{"prompt": "12+7=", "completion": "19"}], tokenizer, DataSpec(path="x", max_length=64))
    (example,) = examples
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "19</s>"
    assert example["input_ids"][0] == tokenizer.bos_token_id


def test_train_on_all_trains_the_prompt_too(tokenizer):
    (example,) = tokenize_records([{"prompt": "12+7=", "completion": "19"}], tokenizer, DataSpec(path="x", train_on="all"))
    assert example["labels"] == example["input_ids"] and tokenizer.decode(example["input_ids"]) == "<s>12+7=19</s>"


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


def test_s3_data_path_loads_through_the_same_credentials(object_store, s3_storage_uri, tokenizer):
    from orchestrator.storage.fs import open_storage

    storage = open_storage(s3_storage_uri)
    storage.write_text(storage.path("data/train.jsonl"), "".join(json.dumps(r) + "\n" for r in ROWS))
    path = f"{s3_storage_uri}/data/train.jsonl"
    assert check_rows(path, DataSpec(path=path), "data.path", lambda: tokenizer).rows == 20
    records = read_rows(path, DataSpec(path=path), "data.path", tokenizer)
    assert len(records) == 20 and records[0]["prompt"] == "0+1="


_TOKENIZE_IN_A_FRESH_PROCESS = """
import json, sys
from orchestrator.builtin.models import build_tokenizer
from orchestrator.spec import DataSpec
from orchestrator.train.data import read_rows, tokenize_records
from orchestrator.train.model import load_tokenizer
path, max_length = sys.argv[1], int(sys.argv[2])
spec = DataSpec(path=path, max_length=max_length)
tokenizer = load_tokenizer(sys.argv[3]) if len(sys.argv) > 3 else build_tokenizer()
examples = tokenize_records(read_rows(path, spec, "data.path", tokenizer), tokenizer, spec)
print(json.dumps({"cache": examples.cache_files[0]["filename"], "first": examples[0]["input_ids"]}))
"""


def _tokenize_in_a_fresh_process(path: str, max_length: int, cache_dir, tokenizer_dir=None) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_CACHE": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", _TOKENIZE_IN_A_FRESH_PROCESS, path, str(max_length),
                           *([str(tokenizer_dir)] if tokenizer_dir else [])],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # five fresh Python processes that each load the tokenizer: ~14 s
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
    # The same tokenizer saved beside another model (two sizes of one family) reads the same cache.
    from orchestrator.builtin.models import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "another-model")
    elsewhere = _tokenize_in_a_fresh_process(path, 512, cache_dir, tmp_path / "another-model")
    assert elsewhere == first and os.stat(first["cache"]).st_mtime_ns == written_at, "the same tokenizer re-tokenized"

    shorter = _tokenize_in_a_fresh_process(path, 6, cache_dir)
    assert shorter["cache"] != first["cache"] and len(shorter["first"]) == 6 < len(first["first"])

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({**r, "prompt": "x" + r["prompt"]}) + "\n" for r in ROWS))
    rewritten = _tokenize_in_a_fresh_process(path, 512, cache_dir)
    assert rewritten["cache"] != first["cache"] and rewritten["first"] != first["first"]


def test_examples_without_completion_tokens_are_dropped(tokenizer):
    rows = [{"prompt": "a long prompt that fills the window", "completion": "x"}, {"prompt": "1+1=", "completion": "2"}]
    (kept,) = tokenize_records(rows, tokenizer, DataSpec(path="x", max_length=12))
    assert tokenizer.decode(kept["input_ids"]).startswith("<s>1+1=")
    with pytest.raises(PreflightError, match="data.max_length: 3 leaves no tokens to train on"):
        tokenize_records(rows, tokenizer, DataSpec(path="x", max_length=3))


GOOD = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(200)]
LATIN1 = '{"prompt": "café=", "completion": "x"}'.encode("latin-1")


def _jsonl(tmp_path, bad: dict[int, bytes], rows=GOOD) -> str:
    """`rows` as JSON lines, line n (from 1) replaced by the raw bytes bad[n]."""
    lines = [json.dumps(row).encode() for row in rows]
    for number, raw in bad.items():
        lines[number - 1] = raw
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("line, problem", [
    (LATIN1, "not UTF-8 text (byte 0xe9 at column 16)"),
    (b'{"prompt": "1+1=", "completion": null}', "'completion' is null"),
    (b'{"prompt": "1+1="}', "has no field 'completion'"),
    (b'{"prompt": "1+1=", "completion": ["2"]}', "'completion' holds a list, not text"),
    (b'{"prompt": "1+1=", "completion": "2"', "not valid JSON (Expecting ',' delimiter at column 37)"),
    (b'["1+1=", "2"]', "a JSON list, not an object"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_the_row(line, problem, tmp_path, tokenizer):
    path = _jsonl(tmp_path, {101: line})
    with pytest.raises(PreflightError) as refused:
        check_rows(path, DataSpec(path=path), "data.path", lambda: tokenizer)
    assert str(refused.value) == f"data.path: {path} row 101: {problem}"


def test_the_check_streams_and_stops_at_the_first_bad_row(tmp_path, tokenizer, monkeypatch):
    from orchestrator.train import sources

    parsed, read_row = [], sources.json_row
    monkeypatch.setattr(sources, "json_row", lambda line: parsed.append(line) or read_row(line))
    path = _jsonl(tmp_path, {3: b'{"prompt": "1+1=", "completion": null}', 150: LATIN1})
    with pytest.raises(PreflightError, match="row 3: 'completion' is null"):
        check_rows(path, DataSpec(path=path), "data.path", lambda: tokenizer)
    first, second, third = (json.dumps(GOOD[0]).encode(), json.dumps(GOOD[1]).encode(), b'{"prompt": "1+1=", "completion": null}')
    assert len(parsed) == 103 and parsed[100:] == [first, second, third], \
        "after the first 100 rows (their fields are the columns) the check reads rows 1-3 and stops"


def test_skipped_rows_are_counted_and_the_workers_leave_out_the_same_ones(tmp_path, tokenizer):
    path = _jsonl(tmp_path, {5: LATIN1, 101: b'{"prompt": "1+1=", "completion": null}', 150: b'{"prompt": "x"}'})
    spec = DataSpec(path=path, bad_rows="skip")
    check = check_rows(path, spec, "data.path", lambda: tokenizer)
    assert (check.rows, check.skipped) == (200, 3)
    assert check.note("data.path", "train.jsonl") == ("data.path: skipped 3 of 200 rows of train.jsonl (data.bad_rows: "
                                                      "skip); the first, row 5: not UTF-8 text (byte 0xe9 at column 16)")
    assert read_rows(path, spec, "data.path", tokenizer)["row"] == [n for n in range(1, 201) if n not in (5, 101, 150)]
    with pytest.raises(PreflightError, match=f"^data.path: {path} row 5: not UTF-8"):  # a worker, had preflight not run
        read_rows(path, DataSpec(path=path), "data.path", tokenizer)
    everything_bad = _jsonl(tmp_path, {n: LATIN1 for n in range(1, 3)}, rows=GOOD[:2])
    with pytest.raises(PreflightError, match="has no usable row \\(row 1: not UTF-8"):
        check_rows(everything_bad, spec, "data.path", lambda: tokenizer)


def test_rows_empty_after_tokenization_are_counted(tmp_path, tokenizer):
    from orchestrator.train.data import prepare_data
    from tests.helpers import make_spec

    rows = GOOD[:20] + [{"prompt": "a prompt longer than max_length", "completion": "x"}] * 3
    path = _jsonl(tmp_path, {}, rows=rows)
    data = prepare_data(make_spec(data={"path": path, "max_length": 16, "eval_fraction": 0.1}), path, None, tokenizer)
    assert (data.report.rows, data.report.empty) == (23, 3)
    assert (data.report.train_examples, data.report.eval_examples) == (18, 2) == (len(data.train), len(data.eval))


def test_bad_data_stops_the_run_before_anything_is_written(tmp_path, capsys):
    """Issue 23's case as a user meets it: one line, exit 2, nothing in storage (the workers never start)."""
    import yaml

    from orchestrator import cli
    from orchestrator.storage.fs import open_storage
    from tests.helpers import make_spec

    path = _jsonl(tmp_path, {101: LATIN1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(make_spec(f"file://{tmp_path}/store", raw=True, data={"path": path})))
    code = cli.main(["run", str(job)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"error: data.path: {path} row 101: not UTF-8 text (byte 0xe9 at column 16)"]
    storage = open_storage(f"file://{tmp_path}/store")
    assert not storage.exists(storage.root) or storage.list_files(storage.root) == []


def test_a_hub_layout_directory_reads_its_split_and_subset(tmp_path, tokenizer):
    """A local directory laid out like a Hub dataset (README configs, data/<split>-*.parquet) through
    datasets.load_dataset, offline."""
    import datasets

    for subset, offset in (("easy", 0), ("hard", 1000)):
        for split in ("train", "test"):
            rows = [{"prompt": f"{subset}-{split}-{i}", "completion": str(offset + i)} for i in range(6)]
            (tmp_path / subset).mkdir(exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / subset / f"{split}-00000-of-00001.parquet"))
    configs = "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train-*\n"
                      f"  - split: test\n    path: {s}/test-*\n" for s in ("easy", "hard"))
    (tmp_path / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    spec = DataSpec(path=str(tmp_path), subset="hard", split="test")
    records = read_rows(str(tmp_path), spec, "data.path", tokenizer)
    assert records["prompt"] == [f"hard-test-{i}" for i in range(6)]
    with pytest.raises(PreflightError, match="data.path: cannot read"):
        check_rows(str(tmp_path), DataSpec(path="x", subset="medium"), "data.path", lambda: tokenizer)


def test_the_tokenizer_key_is_its_content_not_its_path(tmp_path, tokenizer):
    from orchestrator.train.data import tokenizer_key
    from orchestrator.train.model import load_tokenizer

    tokenizer.save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "b")
    a, b = load_tokenizer(str(tmp_path / "a")), load_tokenizer(str(tmp_path / "b"))
    assert tokenizer_key(a) == tokenizer_key(b) == tokenizer_key(tokenizer)
    b.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})  # changes what some texts tokenize to
    assert tokenizer_key(b) != tokenizer_key(a)
    a.eos_token = a.convert_ids_to_tokens(a.pad_token_id)  # the id appended to every row
    assert tokenizer_key(a) != tokenizer_key(load_tokenizer(str(tmp_path / "b")))


def test_a_tokenizer_that_cannot_be_serialized_is_keyed_as_pickled():
    # A custom (Python) pre-tokenizer makes the tokenizers library refuse to serialize; the key falls back to
    # the object as pickled, which still tells different tokenizers apart.
    from datasets.fingerprint import Hasher

    from orchestrator.train.data import tokenizer_key

    class Unserializable:
        def to_str(self):
            raise Exception("Custom PreTokenizer cannot be serialized")

    class CustomTokenizer:
        backend_tokenizer = Unserializable()
        vocab = {"a": 0}

    assert tokenizer_key(CustomTokenizer()) == Hasher.hash(CustomTokenizer())
