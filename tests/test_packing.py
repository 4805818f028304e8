"""Packing: a packed batch trains exactly as the same examples unpacked (loss and gradients, fp32), every example
lands in one row once, and the packed rows, the sample order and evaluation stay deterministic."""

from __future__ import annotations

import random

import pytest
import torch

from orchestrator.train.data import IGNORE_INDEX, collate, real_tokens
from orchestrator.train.packing import pack_batch

PAD = 0


def _examples(count: int, seed: int = 0, longest: int = 40) -> list[dict]:
    """Examples of varied lengths whose labels skip a prompt, like prompt_completion's."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length, prompt = rng.randint(4, longest), rng.randint(1, 3)
        ids = [rng.randint(3, 99) for _ in range(length)]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def _packed(examples: list[dict], max_length: int) -> list[dict]:
    batch = pack_batch({"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]},
                       max_length)
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _model(family: str, attention: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)


def _loss_and_gradients(model, batch: dict, **options) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch, **options).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_same_examples_unpacked(family, attention):
    """The reference is the ordinary padded batch with an attention mask: what the loop trains without packing.
    transformers' loss is the mean over labelled tokens, so equal losses mean equal token-weighted losses."""
    model = _model(family, attention)
    examples = _examples(10)
    rows = _packed(examples, max_length=64)
    assert len(rows) < len(examples), "nothing was packed"
    want_loss, want_grads = _loss_and_gradients(model, collate(examples, PAD))
    packed_batch = collate(rows, PAD)
    got_loss, got_grads = _loss_and_gradients(model, packed_batch, use_cache=False)
    assert abs(got_loss - want_loss) <= 1e-5
    assert max((got - want).abs().max().item() for got, want in zip(got_grads, want_grads)) <= 1e-5
    # Sharp enough to see attention across examples: with a cache, transformers ignores the packed positions.
    leaked_loss, _ = _loss_and_gradients(model, packed_batch, use_cache=True)
    assert abs(leaked_loss - want_loss) > 1e-3


def test_every_example_lands_once_in_a_row_with_its_own_positions():
    examples = _examples(300, seed=1, longest=120)
    rows = _packed(examples, max_length=128)
    found = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 128
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == IGNORE_INDEX  # not the target of the previous example's last token
            found.append((tuple(row["input_ids"][start:end]), tuple(row["labels"][start + 1:end])))
    assert sorted(found) == sorted((tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in examples)
    fill = sum(map(real_tokens, [[row] for row in rows])) / (128 * len(rows))
    assert fill > 0.95, f"rows only {fill:.0%} full"
    assert _packed(examples, 128) == rows, "packing must be deterministic"


def test_a_packed_batch_pads_with_positions_and_no_attention_mask():
    rows = _packed(_examples(6), max_length=48)
    batch = collate(rows, PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    shortest = min(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    length, width = len(rows[shortest]["input_ids"]), batch["input_ids"].shape[1]
    assert batch["position_ids"][shortest, length:].tolist() == list(range(width - length))
    assert (batch["labels"][shortest, length:] == IGNORE_INDEX).all()
    assert real_tokens(rows) == sum(len(row["input_ids"]) for row in rows) < batch["input_ids"].numel()


def test_packed_rows_and_the_sample_order_do_not_depend_on_the_cache(tmp_path, monkeypatch):
    """Two nodes (two caches) pack the same rows, and a resumed worker draws the same ones; evaluation stays unpacked."""
    import datasets

    from orchestrator.builtin.datasets import resolve_data_path
    from orchestrator.builtin.models import build_tokenizer
    from orchestrator.train.data import BatchSchedule, prepare_data
    from tests.helpers import make_spec

    spec = make_spec(data={"path": "builtin:chat", "max_length": 256, "packing": True})
    prepared = []
    for node in ("a", "b"):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / node))
        prepared.append(prepare_data(spec, resolve_data_path("builtin:chat"), None, build_tokenizer()))
    first, second = prepared
    assert first.train.cache_files[0]["filename"] != second.train.cache_files[0]["filename"]
    assert first.train[:] == second.train[:] and first.eval[:] == second.eval[:]
    assert "position_ids" not in first.eval.column_names
    report = first.report
    assert report.packed and report.train_rows == len(first.train) < report.train_examples
    schedule = BatchSchedule(len(first.train), 4, 1, 2, 1, seed=0)
    assert BatchSchedule(len(second.train), 4, 1, 2, 1, seed=0).indices(7, 0) == schedule.indices(7, 0)
