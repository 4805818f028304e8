"""Real DeepSpeed in the test process (one rank, gloo, one process group for the module): every method ×
ZeRO stage 0/2/3 trained by the project and checked against an independent reference (tests/references.py),
and what `deepspeed.initialize` does to each method's structure."""

from __future__ import annotations

import functools
import os
import socket

import pytest
import torch

from orchestrator.adapters import get_method
from orchestrator.adapters.registry import peft_export
from orchestrator.spec import validate_spec
from orchestrator.train.checkpoint import save_adapter
from orchestrator.train.engine import build_engine
from orchestrator.train.model import build_adapted_model
from orchestrator.train.optim import check_rates, expected_rates, make_optimizer
from tests.references import ExplicitDeltaLora, copy_initial_adapter, reference_model, reference_optimizer, train_reference


@pytest.fixture(scope="module")
def single_rank_group():
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    variables = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()
    # Ray workers started later in this session inherit the environment: leave no rank variables behind.
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def job_spec(stage: int, adapter: dict, optim: dict | None = None, config: dict | None = None):
    return validate_spec({"name": "t", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"},
                          "adapter": {"target_modules": "all-linear", **adapter}, "optim": optim or {},
                          "deepspeed": {"zero_stage": stage, "config": config or {}}, "scaling": {"num_workers": 1}})


def initialized(tiny_llama_path, stage: int, adapter: dict, optim: dict | None = None):
    spec = job_spec(stage, adapter, optim)
    model, _ = build_adapted_model(spec, tiny_llama_path, torch.float32)
    optimizer = make_optimizer(model, spec)
    built = expected_rates(optimizer)
    engine = build_engine(model, optimizer, spec)
    return engine, built


# Dropout off: the reference draws masks differently (LoRA-FA regenerates its mask from a seed); dropout's
# own exactness is tested in tests/test_adapters.py and across resume in the Ray runs.
CELLS = {
    "lora": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {}),
    "rslora": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "rslora": True}, {}),
    "lora+": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {"lora_plus_ratio": 8}),
    "lora_fa": ({"method": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0}, {}),
    "lora_fa_projected": ({"method": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0, "project_gradient": True}, {}),
    "vera": ({"method": "vera", "r": 32, "d_initial": 0.1}, {"lr": 2e-2}),
    "delta_lora": ({"method": "delta_lora", "r": 4, "alpha": 8, "start_step": 1, "update_ratio": 2.0}, {}),
    "delta_lora+": ({"method": "delta_lora", "r": 4, "alpha": 8, "start_step": 1, "update_ratio": 2.0}, {"lora_plus_ratio": 4}),
}
STEPS = 4


def _batches(vocab: int, steps: int) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(steps + 1):  # the last one is a probe, never trained on
        ids = torch.randint(3, vocab, (4, 12), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def _load_base(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _reference_run(path: str, adapter: dict, optim: dict, initial: dict, batches: list[dict], grad_clip: float):
    model = reference_model(_load_base(path), adapter)
    copy_initial_adapter(initial, model)
    delta = ExplicitDeltaLora(model, adapter["start_step"], adapter["update_ratio"]) if adapter["method"] == "delta_lora" else None
    losses = train_reference(model, reference_optimizer(model, adapter, optim), [[b] for b in batches[:-1]], grad_clip, delta)
    model.eval()
    with torch.no_grad():
        return losses, model(**batches[-1]).logits


def _ablated(cell: str, adapter: dict, optim: dict) -> tuple[dict, dict] | None:
    """The cell without the rule that sets it apart, to show that the comparison is sharp enough to see it."""
    if cell.endswith("+"):
        return adapter, {**optim, "lora_plus_ratio": None}
    return {"rslora": ({**adapter, "rslora": False}, optim),
            "lora_fa_projected": ({**adapter, "project_gradient": False}, optim),
            "delta_lora": ({**adapter, "update_ratio": 0.0}, optim)}.get(cell)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("cell", list(CELLS))
def test_method_matches_its_independent_reference(single_rank_group, tiny_llama_path, tmp_path, cell, stage):
    from peft import PeftModel

    adapter, optim = CELLS[cell]
    optim = {"lr": 1e-2, "scheduler": "constant", **optim}
    # Parameters really partitioned under ZeRO-3, as with any real model.
    spec = job_spec(stage, adapter, optim, {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {})
    method = get_method(spec.adapter.method)
    torch.manual_seed(0)
    model, _ = build_adapted_model(spec, tiny_llama_path, torch.float32)
    initial = peft_export(model, spec.adapter)[0]
    batches = _batches(model.config.vocab_size, STEPS)

    engine = build_engine(model, make_optimizer(model, spec), spec)
    losses = []
    for step, batch in enumerate(batches[:-1]):
        if method.before_step is not None:
            method.before_step(engine.module, spec.adapter, step, stage == 3)
        loss = engine(**batch).loss
        losses.append(loss.item())
        engine.backward(loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        trained_logits = engine(**batches[-1]).logits
    save_adapter(engine.module, tmp_path / "adapter", zero3=stage == 3, is_writer=True,
                 export=functools.partial(method.export or peft_export, spec=spec.adapter))

    full_adapter = spec.adapter.model_dump()
    reference_losses, reference_logits = _reference_run(tiny_llama_path, full_adapter, optim, initial, batches, spec.optim.grad_clip)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-4, atol=0)
    gap = (trained_logits - reference_logits).abs().max().item()
    print(f"{cell} z{stage}: logits gap {gap:.3g}")
    assert gap <= 2e-4, f"logits differ from the reference by {gap:g}"
    ablated = _ablated(cell, full_adapter, optim)
    if ablated is not None:
        other = _reference_run(tiny_llama_path, *ablated, initial, batches, spec.optim.grad_clip)[1]
        assert (trained_logits - other).abs().max().item() > 10 * max(gap, 1e-5), "the comparison cannot see the method's rule"

    # The exported adapter, loaded by stock PEFT alone, and merged, reproduce the trained model.
    loaded = PeftModel.from_pretrained(_load_base(tiny_llama_path), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[-1]).logits, trained_logits, rtol=0, atol=2e-4)
        torch.testing.assert_close(loaded.merge_and_unload()(**batches[-1]).logits, trained_logits, rtol=0, atol=2e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_vera_trains_in_bf16_with_shared_projections(single_rank_group, tiny_llama_path, stage):
    """DeepSpeed's bf16 converts parameters, not PEFT's shared projection buffers: the forward must cope."""
    spec = job_spec(stage, {"method": "vera", "r": 64}, {"lr": 1e-2}, {"bf16": {"enabled": True}})
    model, _ = build_adapted_model(spec, tiny_llama_path, torch.bfloat16)
    engine = build_engine(model, make_optimizer(model, spec), spec)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    layers = [m for _, m in engine.module.named_modules() if hasattr(m, "vera_lambda_b")]
    assert {m.vera_A["default"].dtype for m in layers} == {torch.bfloat16}
    assert len({m.vera_A["default"].data_ptr() for m in layers}) == 1
    assert len({m.vera_B["default"].data_ptr() for m in layers}) == 1


@pytest.mark.parametrize("stage", [2, 3])
def test_vera_projections_stay_one_storage_after_initialize(single_rank_group, tiny_llama_path, stage):
    engine, _ = initialized(tiny_llama_path, stage, {"method": "vera", "r": 64})
    layers = [m for _, m in engine.module.named_modules() if hasattr(m, "vera_lambda_b")]
    assert len(layers) == 14
    assert len({m.vera_A["default"].data_ptr() for m in layers}) == 1
    assert len({m.vera_B["default"].data_ptr() for m in layers}) == 1


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_plus_rates_survive_initialize(single_rank_group, tiny_llama_path, stage):
    engine, built = initialized(tiny_llama_path, stage, {"method": "lora", "r": 4}, {"lr": 1e-4, "lora_plus_ratio": 16})
    assert [name for name, _ in built] == ["A", "B"]
    check_rates(engine.optimizer, built)
    assert engine.optimizer.param_groups[1]["lr"] == pytest.approx(16 * engine.optimizer.param_groups[0]["lr"])
