"""Load a base model under ZeRO-3 so that each worker materializes only its own partition of it.

transformers builds the model inside DeepSpeed's `zero.Init` while a `HfDeepSpeedConfig` with ZeRO-3 is
alive: every parameter is partitioned as soon as its module is built. Its `from_pretrained` then has rank 0
read the whole checkpoint and hand each layer out by broadcast, so rank 0 still touches every byte. Here, for
a local safetensors checkpoint whose tensors are the model's parameters one to one (most models), each rank
reads only the byte range of its own partition of each tensor, with plain file reads: no rank holds, maps or
caches more than its share. Anything else (a hub id, .bin files, keys transformers converts on load, such as a
mixture of experts' per-expert weights) goes through transformers' own ZeRO-3 loading.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


@contextmanager
def transformers_zero3(ds_config: dict[str, Any]):
    """Inside: transformers builds models inside DeepSpeed's zero.Init, and PEFT attaches to their partitioned
    layers. transformers looks the config up through a weak reference, so this keeps it alive; leaving drops it,
    so that models loaded afterwards in the same process (a reference, an export check) load whole."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    try:
        yield hf_deepspeed_config
    finally:
        unset_hf_deepspeed_config()


def load_zero3_partitioned(model_path: str, dtype: torch.dtype, trust_remote_code: bool):
    """The model with every base parameter partitioned across the ranks, each rank's share read from disk.
    Call inside `transformers_zero3`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    index = checkpoint_index(model_path)
    if index is not None:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        with _without_random_init():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        if read_own_partitions(model, index):
            return model
        # The checkpoint's names or shapes are not the model's (transformers converts them on load).
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)


@contextmanager
def _without_random_init():
    """from_config under ZeRO-3 random-initializes the partitioned model layer by layer (rank 0 draws every
    value and broadcasts it): minutes for a 70B model, and draws from the RNG that the adapter's init uses next.
    Every parameter is read from the checkpoint right after, so that step is skipped (the buffers a model
    computes in its constructor, such as rotary frequencies, are unaffected)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    original = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if original is None:  # another transformers version: its own init runs, which is only slower
        yield
        return
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original


def checkpoint_index(model_path: str) -> Optional[dict[str, tuple[Path, dict]]]:
    """{tensor name: (file, its safetensors header entry)} of a local safetensors checkpoint; None otherwise."""
    directory = Path(model_path)
    index_file = directory / "model.safetensors.index.json"
    if index_file.exists():
        files = sorted({directory / name for name in json.loads(index_file.read_text())["weight_map"].values()})
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        return None
    index = {}
    for file in files:
        header, _ = _read_header(file)
        index.update({name: (file, entry) for name, entry in header.items() if name != "__metadata__"})
    return index


def _read_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)), 8 + length


def read_own_partitions(model: torch.nn.Module, index: dict[str, tuple[Path, dict]]) -> bool:
    """Fill this rank's partition of every parameter from the checkpoint; False (nothing read) when the
    checkpoint does not hold exactly the model's parameters, by name and size."""
    import deepspeed.comm as dist

    prefix = getattr(model, "base_model_prefix", "")

    def stored_name(name: str) -> Optional[str]:
        return next((k for k in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}") if k in index), None)

    sources = {}
    for name, parameter in model.named_parameters():  # tied weights once, under their first name
        key = stored_name(name)
        if key is None or not hasattr(parameter, "ds_tensor") or getattr(parameter, "ds_secondary_tensor", None) is not None:
            return False
        file, entry = index[key]
        if entry["dtype"] not in _SAFETENSORS_DTYPES or _numel(entry["shape"]) != parameter.ds_numel:
            return False
        sources[key] = (parameter, file, entry)
    # Every stored tensor must be one of them, or a tied alias of one; a stored buffer is left to transformers.
    aliases = {stored_name(name) for name, _ in model.named_parameters(remove_duplicate=False)}
    if set(index) - set(sources) - aliases:
        return False
    offsets = {file: _read_header(file)[1] for _, file, _ in sources.values()}
    handles = {file: open(file, "rb", buffering=0) for file in offsets}
    try:
        for parameter, file, entry in sources.values():
            partition = parameter.ds_tensor
            size = partition.ds_numel
            start = size * dist.get_rank(group=parameter.ds_process_group)
            count = max(0, min(size, parameter.ds_numel - start))
            if count:
                stored = _SAFETENSORS_DTYPES[entry["dtype"]]
                values = _read_range(handles[file], offsets[file] + entry["data_offsets"][0], start, count, stored)
                with torch.no_grad():
                    partition.data.narrow(0, 0, count).copy_(values)
    finally:
        for handle in handles.values():
            handle.close()
    return True


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _read_range(handle, data_start: int, first: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements [first, first + count) of a flattened tensor stored at data_start, read into a fresh tensor."""
    item = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(count * item, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    handle.seek(data_start + first * item)
    done = 0
    while done < len(view):
        read = handle.readinto(view[done:])
        if not read:
            raise OSError(f"{handle.name}: checkpoint ends before its header says")
        done += read
    return raw.view(dtype)
