"""Load the base model, freeze it, attach the adapter, and prove that only adapter weights train."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.adapters import get_method
from orchestrator.spec import JobSpec
from orchestrator.train.checkpoint import ADAPTER_FLAG


@dataclass
class ParameterCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / total {self.total:,} ({self.percent:.3f}%)"


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_dtype(spec: JobSpec) -> torch.dtype:
    """The dtype of the base weights and the forward: the plan's precision."""
    from orchestrator.plan import precision

    return torch.bfloat16 if precision(spec) == "bf16" else torch.float32


def _zero3(ds_config: dict[str, Any] | None) -> bool:
    return ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3


def load_base_model(spec: JobSpec, model_path: str, dtype: torch.dtype, ds_config: dict[str, Any] | None = None):
    """The frozen base. Given a ZeRO-3 DeepSpeed config (and inside `transformers_zero3`), each worker
    materializes only its partition of it (train/zero3_load.py); otherwise every worker loads all of it."""
    from transformers import AutoModelForCausalLM

    if _zero3(ds_config):
        from orchestrator.train.zero3_load import load_zero3_partitioned

        return load_zero3_partitioned(model_path, dtype, spec.model.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=spec.model.trust_remote_code)


def build_adapted_model(spec: JobSpec, model_path: str, dtype: torch.dtype | None = None,
                        ds_config: dict[str, Any] | None = None):
    """The PEFT model to train, and its parameter counts; raises if any base weight is trainable. `dtype`:
    the run's (train.precision) unless given; `ds_config`: the plan's DeepSpeed config, which under ZeRO-3
    partitions the base while it loads (PEFT attaches to the partitioned base while transformers knows it)."""
    from orchestrator.train.engine import return_freed_tensors_to_the_system

    if not spec.scaling.use_gpu:
        return_freed_tensors_to_the_system(zero3=_zero3(ds_config))
    if _zero3(ds_config):
        from orchestrator.train.engine import prepare_deepspeed
        from orchestrator.train.zero3_load import transformers_zero3

        prepare_deepspeed(spec.scaling.use_gpu)  # zero.Init imports DeepSpeed, which picks its accelerator then
        import deepspeed

        # zero.Init reads the world size from DeepSpeed's communication layer: over the workers' process group.
        deepspeed.init_distributed()
        context = transformers_zero3(ds_config)
    else:
        context = nullcontext()
    with context:
        return _build_adapted_model(spec, model_path, dtype or run_dtype(spec), ds_config)


def _build_adapted_model(spec: JobSpec, model_path: str, dtype: torch.dtype, ds_config: dict[str, Any] | None):
    model = load_base_model(spec, model_path, dtype, ds_config)
    model.requires_grad_(False)
    base_parameter_ids = {id(p) for p in model.parameters()}
    model = get_method(spec.adapter.method).attach(model, spec.adapter)
    # A method (or a PEFT default such as modules_to_save) that unfreezes base weights would
    # silently turn adapter training into full fine-tuning; refuse instead.
    leaked = [name for name, p in model.named_parameters() if p.requires_grad and id(p) in base_parameter_ids]
    if leaked:
        raise RuntimeError(f"base parameters are trainable after attaching the adapter: {leaked[:5]}")
    for parameter in model.parameters():
        if id(parameter) not in base_parameter_ids:
            setattr(parameter, ADAPTER_FLAG, True)
    if spec.train.gradient_checkpointing:
        # transformers' default is non-reentrant checkpointing: the frozen base's inputs need no grad
        # flag, and it recomputes correctly under ZeRO-3's gathered parameters.
        getattr(model, "get_base_model", lambda: model)().activation_checkpointing_enable()
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise RuntimeError("the adapter added no trainable parameters")
    total = sum(_numel(p) for p in model.parameters())
    return model, ParameterCounts(trainable=trainable, total=total)


def _numel(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def canonical_base_name(peft_name: str) -> str:
    """`base_model.model.x.q_proj.base_layer.weight` → `x.q_proj.weight`, the name in the base checkpoint."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def frozen_weights_checksum(model: torch.nn.Module, zero3: bool = False) -> str:
    """sha256 over every frozen parameter (name and bytes), gathered one at a time under ZeRO-3 (collective
    then: every rank calls it, and gets the same digest, whether or not the base was partitioned yet)."""
    digest = hashlib.sha256()
    frozen = sorted(
        ((canonical_base_name(name), p) for name, p in model.named_parameters() if not p.requires_grad),
        key=lambda item: item[0],
    )
    for name, parameter in frozen:
        if zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([parameter])
        else:
            gather = nullcontext()
        with gather:
            data = parameter.detach().cpu().contiguous()
            digest.update(name.encode())
            digest.update(data.view(torch.uint8).numpy())  # the buffer itself: no copy of the weight
    return digest.hexdigest()
