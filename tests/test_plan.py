"""plan is pure: DeepSpeed configs per ZeRO stage, resources, and a trainable estimate that matches PEFT."""

from __future__ import annotations

import pytest
import torch

from orchestrator.plan import build_plan, deepspeed_config, worker_resources
from tests.helpers import MINIMAL_SPEC, make_spec


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    config = deepspeed_config(make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": stage}, train={"batch_size": 4, "grad_accum": 3},
                                        scaling={"num_workers": 2}))
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
    spec = make_spec(base=MINIMAL_SPEC, scaling={"num_workers": 4, "use_gpu": True, "cpus_per_worker": 8})
    assert deepspeed_config(spec)["bf16"]["enabled"] is True
    assert worker_resources(spec) == {"CPU": 8, "GPU": 1}
    assert build_plan(spec).cluster_needs == {"CPU": 32, "GPU": 4}


def test_raw_deepspeed_config_is_merged_last_and_deeply():
    raw_config = {"zero_optimization": {"stage3_param_persistence_threshold": 0}, "gradient_clipping": 0.5}
    config = deepspeed_config(make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": 3, "config": raw_config}))
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert config["gradient_clipping"] == 0.5


def test_clipping_off_when_zero():
    assert "gradient_clipping" not in deepspeed_config(make_spec(base=MINIMAL_SPEC, optim={"grad_clip": 0}))


@pytest.mark.parametrize("targets, rank", [(["q_proj", "v_proj"], 8), ("all-linear", 4), (["down_proj"], 16)])
def test_trainable_estimate_matches_peft(tiny_llama_path, targets, rank):
    from transformers import AutoConfig

    from orchestrator.train.model import build_adapted_model

    spec = make_spec(base=MINIMAL_SPEC, adapter={"method": "lora", "r": rank, "target_modules": targets})
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

    spec = make_spec(base=MINIMAL_SPEC, optim={"lora_plus_ratio": 16}, deepspeed={"zero_stage": 2, "config": raw_config})
    with pytest.raises(JobSpecError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_plan(spec)


def test_lora_plus_groups_carry_the_ratio():
    from orchestrator.train.model import build_adapted_model
    from orchestrator.train.optim import check_rates, expected_rates, make_optimizer

    from orchestrator.builtin.models import resolve_model_path

    spec = make_spec(base=MINIMAL_SPEC, optim={"lr": 1e-4, "lora_plus_ratio": 16, "weight_decay": 0.1})
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


def _peft_trainable(base, config) -> int:
    """The reference: stock PEFT on a real model, without this project's attach."""
    from peft import get_peft_model

    base.requires_grad_(False)
    model = get_peft_model(base, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize(
    "model, method, targets",
    [
        ("tiny-llama", "lora", ["q_proj", "embed_tokens"]),
        ("tiny-llama", "lora", ["lm_head"]),
        ("tiny-llama", "lora", "all-linear"),
        ("tiny-llama", "vera", ["lm_head"]),
        ("tiny-llama", "vera", ["q_proj", "v_proj", "lm_head"]),
        ("tiny-llama", "vera", "all-linear"),
        ("tiny-gpt2", "lora", ["c_attn"]),
        ("tiny-gpt2", "vera", ["c_attn"]),
    ],
)
def test_plan_counts_what_peft_attaches_for_any_layer_type(tiny_llama_path, model, method, targets):
    from peft import LoraConfig, VeraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    if model == "tiny-llama":
        config = AutoConfig.from_pretrained(tiny_llama_path)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    else:
        config = _tiny_gpt2_config()
        base = AutoModelForCausalLM.from_config(config)
    rank = {"lora": 4, "vera": 32}[method]
    # GPT-2's Conv1D stores its weight as (in, out): PEFT needs fan_in_fan_out for it.
    reference = (LoraConfig(r=rank, target_modules=targets, fan_in_fan_out=model == "tiny-gpt2") if method == "lora"
                 else VeraConfig(r=rank, target_modules=targets))
    expected = _peft_trainable(base, reference)

    plan = build_plan(make_spec(base=MINIMAL_SPEC, adapter={"method": method, "r": rank, "target_modules": targets}), config)
    assert plan.trainable_parameters == expected > 0
    assert plan.base_parameters == sum(p.numel() for p in base.parameters() if not p.requires_grad)


def test_adapted_layers_give_in_and_out_features_of_every_layer_type(tiny_llama_path):
    from transformers import AutoConfig

    llama = AutoConfig.from_pretrained(tiny_llama_path)
    layers = build_plan(make_spec(base=MINIMAL_SPEC, adapter={"target_modules": ["q_proj", "embed_tokens", "lm_head"]}), llama).adapted_layers
    head_dim = llama.hidden_size // llama.num_attention_heads
    assert layers["model.embed_tokens"] == (llama.vocab_size, llama.hidden_size)  # (num_embeddings, embedding_dim)
    assert layers["lm_head"] == (llama.hidden_size, llama.vocab_size)
    assert layers["model.layers.1.self_attn.q_proj"] == (llama.hidden_size, llama.num_attention_heads * head_dim)
    assert len(layers) == 2 + llama.num_hidden_layers
    gpt2 = _tiny_gpt2_config()
    layers = build_plan(make_spec(base=MINIMAL_SPEC, adapter={"target_modules": ["c_attn"]}), gpt2).adapted_layers
    assert layers == {f"transformer.h.{i}.attn.c_attn": (32, 96) for i in range(2)}  # Conv1D weight is (in, out)


def test_targets_that_match_nothing_list_the_adaptable_layers(tiny_llama_path):
    from transformers import AutoConfig

    from orchestrator.errors import PreflightError

    config = AutoConfig.from_pretrained(tiny_llama_path)
    with pytest.raises(PreflightError, match=r"\['query'\] match no linear layer, embedding or Conv1D .*embed_tokens, gate_proj, "
                                             r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\)"):
        build_plan(make_spec(base=MINIMAL_SPEC, adapter={"target_modules": ["query"]}), config)
    # A layer PEFT cannot adapt with this method is refused by PEFT itself, in one line.
    with pytest.raises(PreflightError, match=r"adapter: vera cannot be attached to target_modules \['embed_tokens'\] \(.+\)$"):
        build_plan(make_spec(base=MINIMAL_SPEC, adapter={"method": "vera", "target_modules": ["embed_tokens"]}), config)


def test_plan_shows_the_learning_rate_of_every_optimizer_group(tiny_llama_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama_path)
    spec = make_spec(base=MINIMAL_SPEC, adapter={"target_modules": ["q_proj", "embed_tokens"]}, optim={"lr": 1e-4, "lora_plus_ratio": 16})
    assert build_plan(spec, config).learning_rates == {"A": 1e-4, "embedding": 1e-6, "B": pytest.approx(1.6e-3)}
    assert build_plan(make_spec(base=MINIMAL_SPEC, optim={"lr": 1e-4}), config).learning_rates == {"adapter": 1e-4}


@pytest.mark.parametrize("stage, workers, expected", [(1, 4, 1_000_001), (2, 4, 250_001), (3, 4, 250_001), (3, 1, 1_000_001)])
def test_gradient_bucket_holds_a_workers_share_of_the_adapter_where_zero_partitions_gradients(stage, workers, expected):
    # ZeRO-1 reduces whole gradients; ZeRO-2 and 3 keep each worker's share, so a bucket of the whole
    # adapter would be a full copy of its gradients on every worker.
    spec = make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": stage}, scaling={"num_workers": workers})
    assert deepspeed_config(spec, trainable_parameters=1_000_001)["zero_optimization"]["reduce_bucket_size"] == expected
    assert deepspeed_config(spec, trainable_parameters=4 * 10**9)["zero_optimization"]["reduce_bucket_size"] <= 500_000_000


@pytest.mark.parametrize("stage, expected", [(1, 1_000_001), (2, 125_001), (3, 125_001)])
def test_gradient_bucket_holds_one_decoder_layers_adapter_gradients_at_most(stage, expected):
    # Backward produces gradients a layer at a time: with the model's config (8 layers), ZeRO-2 and 3 reduce each
    # layer's as it ends instead of holding a worker's share (500,001 on 2 workers) until it fills.
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, vocab_size=100)
    spec = make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": stage}, scaling={"num_workers": 2})
    assert deepspeed_config(spec, config, trainable_parameters=1_000_001)["zero_optimization"]["reduce_bucket_size"] == expected
    many_workers = make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": stage}, scaling={"num_workers": 16})
    assert deepspeed_config(many_workers, config, 1_000_001)["zero_optimization"]["reduce_bucket_size"] == (
        62_501 if stage >= 2 else 1_000_001)  # a worker's share, where it is the smaller
