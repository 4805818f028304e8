"""plan is pure: DeepSpeed configs per ZeRO stage, resources, and a trainable estimate that matches PEFT."""

from __future__ import annotations

import pytest
import torch

from orchestrator.plan import build_plan, deepspeed_config, worker_resources
from orchestrator.spec import validate_spec

BASE = {"name": "t", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"}}


def spec_with(**sections):
    return validate_spec({**BASE, **sections})


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    config = deepspeed_config(spec_with(deepspeed={"zero_stage": stage}, train={"batch_size": 4, "grad_accum": 3}, scaling={"num_workers": 2}))
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * 2
    assert config["bf16"]["enabled"] is False
    assert config["zero_allow_untested_optimizer"] is True
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    else:
        assert "stage3_gather_16bit_weights_on_model_save" not in config["zero_optimization"]


def test_gpu_runs_use_bf16_and_ask_for_gpus():
    spec = spec_with(scaling={"num_workers": 4, "use_gpu": True, "cpus_per_worker": 8})
    assert deepspeed_config(spec)["bf16"]["enabled"] is True
    assert worker_resources(spec) == {"CPU": 8, "GPU": 1}
    assert build_plan(spec).cluster_needs == {"CPU": 32, "GPU": 4}


def test_raw_deepspeed_config_is_merged_last_and_deeply():
    config = deepspeed_config(spec_with(deepspeed={"zero_stage": 3, "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}, "gradient_clipping": 0.5}}))
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert config["gradient_clipping"] == 0.5


def test_clipping_off_when_zero():
    assert "gradient_clipping" not in deepspeed_config(spec_with(optim={"grad_clip": 0}))


@pytest.mark.parametrize("targets, rank", [(["q_proj", "v_proj"], 8), ("all-linear", 4), (["down_proj"], 16)])
def test_trainable_estimate_matches_peft(tiny_llama_path, targets, rank):
    from transformers import AutoConfig

    from orchestrator.train.model import build_adapted_model

    spec = spec_with(adapter={"method": "lora", "r": rank, "target_modules": targets})
    plan = build_plan(spec, AutoConfig.from_pretrained(tiny_llama_path))
    _, counts = build_adapted_model(spec, tiny_llama_path, torch.float32)
    assert plan.trainable_parameters == counts.trainable
    assert plan.base_parameters + plan.trainable_parameters == counts.total
    # closed form r·(d_in + d_out) per adapted layer
    assert plan.trainable_parameters == sum(rank * (i + o) for i, o in plan.adapted_layers.values())


@pytest.mark.parametrize(
    "raw_config, expected",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "deepspeed.config.optimizer: DeepSpeed would build its own optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, "deepspeed.config.scheduler: DeepSpeed would build its own scheduler"),
        ({"zero_optimization": {"stage": 3}}, "deepspeed.config.zero_optimization.stage: 3 contradicts deepspeed.zero_stage (2)"),
    ],
)
def test_plan_refuses_configs_that_would_silently_change_the_algorithm(raw_config, expected):
    from orchestrator.errors import JobSpecError

    spec = spec_with(optim={"lora_plus_ratio": 16}, deepspeed={"zero_stage": 2, "config": raw_config})
    with pytest.raises(JobSpecError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_plan(spec)


def test_lora_plus_groups_carry_the_ratio():
    from orchestrator.train.model import build_adapted_model
    from orchestrator.train.optim import check_rates, expected_rates, make_optimizer

    from orchestrator.builtin.models import resolve_model_path

    spec = spec_with(optim={"lr": 1e-4, "lora_plus_ratio": 16, "weight_decay": 0.1})
    model, _ = build_adapted_model(spec, resolve_model_path("builtin:tiny-llama"), torch.float32)
    optimizer = make_optimizer(model, spec)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"A", "B"}
    assert groups["B"]["lr"] == pytest.approx(16 * groups["A"]["lr"]) and groups["A"]["lr"] == 1e-4
    assert all(".lora_B." in n for n, p in model.named_parameters() if any(p is q for q in groups["B"]["params"]))
    built = expected_rates(optimizer)
    check_rates(optimizer, built)
    optimizer.param_groups[1]["lr"] = optimizer.param_groups[0]["lr"]  # what a lossy ZeRO wrapper would do
    with pytest.raises(RuntimeError, match="lost the optimizer's per-group learning rates"):
        check_rates(optimizer, built)
