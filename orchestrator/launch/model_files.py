"""Preflight's model check: a config AutoModelForCausalLM builds a causal LM from, and weight files it can
load, judged from file names, shard indexes and safetensors headers (no weight is read into memory)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from orchestrator.errors import PreflightError, first_line

# What from_pretrained loads, in its order of preference (transformers.utils' *_WEIGHTS_* names).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_causal_lm(shown_path: str, config: Any) -> None:
    """The config must be one AutoModelForCausalLM turns into a decoder. Encoders (BERT, RoBERTa, …) have
    a causal-LM class too, but it is a decoder only when the config says `is_decoder`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    kind = f"{type(config).__name__}, model_type {getattr(config, 'model_type', '?')!r}"
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return  # remote code names its own causal-LM class (trust_remote_code decided whether it may run)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise PreflightError(f"model.path: {shown_path} is not a causal language model ({kind}: "
                             f"AutoModelForCausalLM has no class for it)")
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False):
        raise PreflightError(f"model.path: {shown_path} is not a causal language model ({kind}, an encoder; "
                             f"fine-tune a decoder such as Llama, Qwen2, Mistral or GPT-2)")


def check_weights(shown_path: str, model_path: str) -> None:
    """The weights from_pretrained would load exist. A hub id is checked in the local cache only when
    the hub is offline (then the cache is all that loading can use); online, loading downloads them."""
    directory = Path(os.path.expanduser(model_path))
    if not directory.is_dir():
        directory = _cached_snapshot(model_path)
        if directory is None:
            return
    problem = weight_problem(directory)
    if problem:
        raise PreflightError(f"model.path: {shown_path} {problem}")


def weight_problem(directory: Path) -> Optional[str]:
    """Why from_pretrained could not load weights from `directory`, or None."""
    name = next((name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if name is None:
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".gguf"))
        return ("has no weight files (model.safetensors, a sharded index model.safetensors.index.json / "
                "pytorch_model.bin.index.json, or pytorch_model.bin)" + (f"; found only {', '.join(found[:3])}" if found else ""))
    return _index_problem(directory, name) if name.endswith(".index.json") else _unreadable(directory / name)


def _index_problem(directory: Path, index_name: str) -> Optional[str]:
    try:
        shards = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"has a {index_name} that is not a shard index ({type(error).__name__}: {error})"
    missing = [shard for shard in shards if not (directory / shard).is_file()]
    if missing:
        return (f"is missing {len(missing)} of the {len(shards)} weight shards its {index_name} names "
                f"(first: {missing[0]})")
    return next(filter(None, (_unreadable(directory / shard) for shard in shards)), None)


def _unreadable(path: Path) -> Optional[str]:
    """A safetensors file's header must parse and cover the file (a truncated download does not)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return None
    except Exception as error:  # SafetensorError, OSError: a file from_pretrained would fail on
        return f"has an unreadable weight file {path.name} ({first_line(error)})"


def _cached_snapshot(hub_id: str) -> Optional[Path]:
    import huggingface_hub

    if not huggingface_hub.is_offline_mode():
        return None
    try:
        return Path(huggingface_hub.snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached: AutoConfig has already said so, or will, in its own words
        return None
