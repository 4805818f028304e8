"""The model families people fine-tune, each a tiny random-init model built here from its transformers config
(hidden 32, 1-2 layers, vocab 64, a character tokenizer; some without a pad token, some with tied embeddings,
GPT-2 with Conv1D layers, a mixture of experts). In-process, one gloo rank (as tests/test_deepspeed_inprocess.py):
`all-linear` adapts the layers each architecture is known to have (written out below, not derived); LoRA
trains under ZeRO-2 and ZeRO-3 (the base partitioned while it loads), and LoRA-FA, VeRA and Delta-LoRA under
ZeRO-3; the exported adapter, loaded by stock PEFT on the base alone, reproduces the trained logits, and so
does the merged model."""

from __future__ import annotations

import functools

import pytest
import torch

from orchestrator.adapters import get_method
from orchestrator.adapters.registry import peft_export
from orchestrator.plan import build_plan, deepspeed_config
from orchestrator.spec import validate_spec
from orchestrator.train.checkpoint import save_adapter
from orchestrator.train.engine import build_engine
from orchestrator.train.model import build_adapted_model, load_tokenizer
from orchestrator.train.optim import make_optimizer

pytestmark = pytest.mark.slow

LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# family: (config class name, its shape options, the last name part of every layer all-linear must adapt,
#          whether its tokenizer has a pad token). lm_head is never adapted.
FAMILIES = {
    "llama": ("LlamaConfig", {}, LLAMA_LIKE, False),
    "qwen2": ("Qwen2Config", {}, LLAMA_LIKE, True),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, LLAMA_LIKE, True),
    "mistral": ("MistralConfig", {}, LLAMA_LIKE, False),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "num_hidden_layers": 2, "tie_word_embeddings": True}, LLAMA_LIKE, True),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "num_hidden_layers": 2, "tie_word_embeddings": True}, LLAMA_LIKE, True),
    "phi3": ("Phi3Config", {}, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, True),
    "olmo2": ("Olmo2Config", {}, LLAMA_LIKE, True),
    "gpt_neox": ("GPTNeoXConfig", {}, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}, False),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}, {"c_attn", "c_proj", "c_fc"}, False),
    "opt": ("OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 64},
            {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, True),
    "falcon": ("FalconConfig", {}, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}, False),
    # The experts are one fused 3-D parameter per layer and the router is no Linear: all-linear adapts attention
    # and the shared expert (and its gate).
    "qwen2_moe": ("Qwen2MoeConfig", {"moe_intermediate_size": 16, "shared_expert_intermediate_size": 32, "num_experts": 4,
                                     "num_experts_per_tok": 2}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj", "shared_expert_gate"}, False),
}
TIED = {"gemma2", "gemma3", "gpt2", "opt", "falcon"}
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 +-=.,?!'"
VOCAB = 64
METHODS = {
    "lora": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, 1e-2),
    "lora_fa": ({"method": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0}, 1e-2),
    "vera": ({"method": "vera", "r": 16}, 5e-2),
    "delta_lora": ({"method": "delta_lora", "r": 4, "alpha": 8, "start_step": 0, "update_ratio": 2.0}, 1e-2),
}
STEPS = 3


def _tokenizer(with_pad: bool):
    """Characters, with <s>/</s> (and <pad> when asked); ids 0-2 specials, as the configs below say."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>" if with_pad else "<unk>", "<s>", "</s>"] + ([] if not with_pad else ["<unk>"])
    vocab = {token: index for index, token in enumerate(specials + list(CHARACTERS))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **({"pad_token": "<pad>"} if with_pad else {}))


def _build(family: str, directory) -> str:
    import transformers

    class_name, options, _, with_pad = FAMILIES[family]
    shape = {} if family == "gpt2" else dict(SHAPE)
    if family in ("opt", "gpt_neox", "falcon"):
        shape.pop("num_key_value_heads")
        shape.pop("intermediate_size") if family != "gpt_neox" else None
    config = getattr(transformers, class_name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=0 if with_pad else None, **{**shape, **options})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    _tokenizer(with_pad).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def family_path(tmp_path_factory):
    return functools.cache(lambda family: _build(family, tmp_path_factory.mktemp(family)))


def _spec(path: str, method: str, stage: int):
    adapter, lr = METHODS[method]
    zero = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
    return validate_spec({"name": "family", "model": {"path": path}, "data": {"path": "builtin:arithmetic"},
                          "adapter": {**adapter, "target_modules": "all-linear"}, "optim": {"lr": lr, "scheduler": "constant"},
                          "train": {"max_steps": STEPS + 1}, "deepspeed": {"zero_stage": stage, "config": zero},
                          "scaling": {"num_workers": 1}})


def _batch(path: str) -> dict[str, torch.Tensor]:
    """Two examples of different lengths, padded: the pad id is the tokenizer's, or </s> where it has none."""
    tokenizer = load_tokenizer(path)
    batch = tokenizer(["12+34=46", "what is 7+8? 15"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def _train_and_export(path: str, method: str, stage: int, out) -> tuple[list[float], torch.Tensor]:
    """STEPS steps of the project's model, optimizer and engine on one batch; the adapter saved to `out`."""
    spec = _spec(path, method, stage)
    config = deepspeed_config(spec)
    torch.manual_seed(0)
    model, _ = build_adapted_model(spec, path, ds_config=config)
    engine = build_engine(model, make_optimizer(model, spec), spec, ds_config=config)
    adapter_method, batch, losses = get_method(method), _batch(path), []
    for step in range(STEPS):
        if adapter_method.before_step is not None:
            adapter_method.before_step(engine.module, spec.adapter, step, stage == 3)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    save_adapter(engine.module, out, zero3=stage == 3, is_writer=True,
                 export=functools.partial(adapter_method.export or peft_export, spec=spec.adapter))
    return losses, logits


def _assert_peft_alone_reproduces(path: str, adapter_dir, trained_logits: torch.Tensor) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batch = _batch(path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), str(adapter_dir)).eval()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        torch.testing.assert_close(loaded(**inputs).logits, trained_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(loaded.merge_and_unload()(**inputs).logits, trained_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_all_linear_and_lora_under_zero_2_and_3(single_rank_group, family_path, family, tmp_path):
    from transformers import AutoConfig

    path = family_path(family)
    _, _, expected_layers, with_pad = FAMILIES[family]
    config = AutoConfig.from_pretrained(path)
    plan = build_plan(_spec(path, "lora", 2), config)
    layers = {name.rsplit(".", 1)[-1] for name in plan.adapted_layers}
    assert layers == expected_layers, f"{family}: all-linear adapted {sorted(layers)}"
    for method in METHODS:  # PEFT attaches every method to every layer all-linear picks (on the meta device)
        assert build_plan(_spec(path, method, 3), config).trainable_parameters > 0
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token_id == (0 if with_pad else tokenizer.eos_token_id)
    for stage in (2, 3):
        losses, logits = _train_and_export(path, "lora", stage, tmp_path / f"z{stage}")
        assert losses[-1] < losses[0], f"{family} ZeRO-{stage}: LoRA did not train ({losses})"
        _assert_peft_alone_reproduces(path, tmp_path / f"z{stage}", logits)
    if family == "gpt2":  # Conv1D stores its weight (in, out): the stored adapter says so for PEFT
        import json

        assert json.loads((tmp_path / "z3" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["lora_fa", "vera", "delta_lora"])
def test_family_other_methods_under_zero3(single_rank_group, family_path, family, method, tmp_path):
    path = family_path(family)
    losses, logits = _train_and_export(path, method, 3, tmp_path / "adapter")
    assert losses[-1] < losses[0], f"{family} {method}: did not train ({losses})"
    _assert_peft_alone_reproduces(path, tmp_path / "adapter", logits)


@pytest.mark.parametrize("family", sorted(TIED))
def test_tied_embeddings_stay_tied_when_zero3_partitions_the_base(single_rank_group, family_path, family):
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    path = family_path(family)
    spec = _spec(path, "lora", 3)
    model, _ = build_adapted_model(spec, path, ds_config=deepspeed_config(spec))
    base = model.get_base_model()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert hasattr(base.get_input_embeddings().weight, "ds_id"), "the base was not partitioned while it loaded"
    assert not is_deepspeed_zero3_enabled(), "models loaded later in the process must load whole"


def test_plan_says_in_one_line_that_peft_cannot_adapt_fused_experts(family_path):
    """A mixture of experts' experts are one 3-D parameter, no Linear: PEFT refuses them, and plan says so."""
    from transformers import AutoConfig

    from orchestrator.errors import PreflightError

    path = family_path("qwen2_moe")
    for method in METHODS:
        raw = _spec(path, method, 3).model_dump()
        raw["adapter"]["target_modules"] = ["experts"]
        with pytest.raises(PreflightError, match=rf"^adapter: {method} cannot be attached to target_modules \['experts'\] \([^\n]+\)$"):
            build_plan(validate_spec(raw), AutoConfig.from_pretrained(path))
