"""Tiny random-init causal LMs (Llama, Qwen2 shapes) with a byte-level tokenizer, saved like any HF model."""

from __future__ import annotations

from pathlib import Path

from orchestrator.builtin import resolve_builtin

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}
_BUILD = 2  # 2: the tokenizer has a chat template
# Zephyr's template shape: every turn closed by the end-of-sequence token, which ends an assistant's reply.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tokenizer():
    """Byte-level vocabulary (256 bytes + 4 specials): any text encodes, nothing to download; a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Like Llama's tokenizer: every encoded text starts with <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    built = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    built.chat_template = CHAT_TEMPLATE
    return built


def tiny_model_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[TINY_MODELS[name]]
    return config_class(
        vocab_size=len(SPECIAL_TOKENS) + 256, pad_token_id=0, bos_token_id=1, eos_token_id=2, **_SHAPE
    )


def _build_tiny_model(name: str, directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_model_config(name), dtype=torch.float32)
    # Not model.save_pretrained: inside a training worker (torch.distributed up) transformers writes only on global
    # rank 0, and a worker of another rank on a fresh node builds its own copy (train/loop.py: node_local_paths).
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save_pretrained(directory)


def resolve_model_path(path: str) -> str:
    """A real model directory or hub id for `path`; builtin:NAME is built on first use."""
    built = resolve_builtin(path, "model.path", TINY_MODELS, _build_tiny_model, kind="model", version=_BUILD)
    return str(built) if built else path
