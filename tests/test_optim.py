"""The optimizer's groups: LoRA+ gives every parameter the learning rate PEFT's own LoRA+ optimizer gives it."""

from __future__ import annotations

import pytest
import torch

from orchestrator.train.optim import make_optimizer
from tests.helpers import MINIMAL_SPEC, make_spec

LR, RATIO = 1e-4, 16


def frozen_tiny_llama(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.requires_grad_(False)
    return model


def rates_by_parameter(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(rates) == sum(len(group["params"]) for group in optimizer.param_groups), "a parameter is in two groups"
    return rates


def assert_same_rates_as_peft(model, spec, embedding_lr: float) -> dict[str, float]:
    """Our optimizer and PEFT's create_loraplus_optimizer on the same model: {name: our rate}."""
    from peft.optimizers import create_loraplus_optimizer

    peft_rates = rates_by_parameter(create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=embedding_lr))
    our_rates = rates_by_parameter(make_optimizer(model, spec))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(our_rates) == set(peft_rates) == {id(p) for p in trainable.values()}
    for name, parameter in trainable.items():
        assert our_rates[id(parameter)] == pytest.approx(peft_rates[id(parameter)], rel=1e-12), name
    return {name: our_rates[id(p)] for name, p in trainable.items()}


@pytest.mark.parametrize("embedding_lr", [1e-6, 3e-5])
def test_lora_plus_rates_equal_peft_including_embeddings(tiny_llama_path, embedding_lr):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(frozen_tiny_llama(tiny_llama_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    spec = make_spec(base=MINIMAL_SPEC, adapter={"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
                     optim={"lr": LR, "lora_plus_ratio": RATIO, "lora_plus_lr_embedding": embedding_lr})
    rates = assert_same_rates_as_peft(model, spec, embedding_lr)
    by_kind = {kind: {rate for name, rate in rates.items() if f".{kind}." in name}
               for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")}
    assert by_kind["lora_A"] == {LR}
    assert by_kind["lora_B"] == {LR * RATIO}
    assert by_kind["lora_embedding_A"] == by_kind["lora_embedding_B"] == {embedding_lr}
    assert sum(".lora_embedding_" in name for name in rates) == 2


def test_delta_lora_with_lora_plus_rates_equal_peft(tiny_llama_path):
    from orchestrator.adapters import get_method

    spec = make_spec(base=MINIMAL_SPEC, adapter={"method": "delta_lora", "r": 4, "start_step": 2, "target_modules": ["q_proj", "v_proj"]},
                     train={"max_steps": 10}, optim={"lr": LR, "lora_plus_ratio": RATIO})
    model = get_method("delta_lora").attach(frozen_tiny_llama(tiny_llama_path), spec.adapter)
    rates = assert_same_rates_as_peft(model, spec, embedding_lr=1e-6)
    assert {rate for name, rate in rates.items() if ".lora_B." in name} == {LR * RATIO}
    assert {rate for name, rate in rates.items() if ".lora_A." in name} == {LR}


def test_without_lora_plus_matrices_share_one_rate_and_vectors_are_not_decayed(tiny_llama_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(frozen_tiny_llama(tiny_llama_path), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    model.get_base_model().model.norm.weight.requires_grad_(True)  # a trained vector
    spec = make_spec(base=MINIMAL_SPEC, optim={"lr": LR, "weight_decay": 0.1})
    groups = {group["name"]: group for group in make_optimizer(model, spec).param_groups}
    assert {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()} == {"adapter": (LR, 0.1), "no_decay": (LR, 0.0)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(p) for p in trainable if p.ndim == 1}
    assert {id(p) for p in groups["adapter"]["params"]} == {id(p) for p in trainable if p.ndim == 2}


def test_a_restored_schedule_keeps_its_position_and_takes_this_runs_base_rates():
    """A PBT trial continues another trial's checkpoint with perturbed rates: the schedule's place (warm-up,
    cosine decay) comes from the checkpoint, the base rates from the trial's own spec."""
    from transformers import get_scheduler

    from orchestrator.train.optim_state import _load_schedule_keeping_base_rates

    def schedule(rates: list[float]):
        weights = [torch.nn.Parameter(torch.zeros(2)) for _ in rates]
        optimizer = torch.optim.AdamW([{"params": [w], "lr": rate} for w, rate in zip(weights, rates)])
        return optimizer, get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=20)

    saved_optimizer, saved = schedule([1e-3, 4e-3])
    for _ in range(7):
        saved_optimizer.step()
        saved.step()
    factor = saved.get_last_lr()[0] / 1e-3
    assert 0 < factor < 1
    optimizer, restored = schedule([5e-4, 8e-3])  # another base rate and another LoRA+ ratio
    _load_schedule_keeping_base_rates(restored, saved.state_dict())
    assert restored.last_epoch == 7
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4 * factor, 8e-3 * factor])
    assert [group["initial_lr"] for group in optimizer.param_groups] == [5e-4, 8e-3]
    optimizer.step()
    restored.step()
    saved_optimizer.step()
    saved.step()
    next_factor = saved.get_last_lr()[0] / 1e-3
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4 * next_factor, 8e-3 * next_factor])
