"""The registry that maps an adapter method's name to its spec and its implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


@dataclass(frozen=True)
class AdapterMethod:
    """What the rest of the system needs to know about one adapter method."""

    name: str
    spec: type[BaseModel]
    # Wraps a frozen base model with the adapter; returns the model to train (a PEFT model).
    attach: Callable[["nn.Module", BaseModel], "nn.Module"]
    # Closed-form trainable-parameter count from the (d_in, d_out) of every adapted linear layer.
    count_trainable: Callable[[BaseModel, list[tuple[int, int]]], int]
    # LoRA+ (B's learning rate = ratio × A's) only means something when both A and B train.
    trains_a_and_b: bool = True
    # Called by every rank at the start of each optimizer step (Delta-LoRA's snapshot); `zero3`
    # says whether parameters are partitioned and must be gathered to be read.
    before_step: Optional[Callable[["nn.Module", BaseModel, int, bool], None]] = None
    # The adapter as stock PEFT loads it: ({name: tensor}, PeftConfig). Called with adapter
    # parameters gathered. Default: PEFT's own state dict and config.
    export: Optional[Callable[["nn.Module", BaseModel], tuple[dict[str, "torch.Tensor"], Any]]] = None


_METHODS: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    if method.name in _METHODS:
        raise ValueError(f"adapter method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    return _METHODS[name]


def all_methods() -> list[AdapterMethod]:
    return list(_METHODS.values())


def peft_export(model: "nn.Module", spec: BaseModel) -> tuple[dict[str, "torch.Tensor"], Any]:
    """The default export: the PEFT model's own adapter state dict and config."""
    from peft import get_peft_model_state_dict

    state = {name: tensor.detach().cpu().clone() for name, tensor in get_peft_model_state_dict(model).items()}
    return state, model.peft_config["default"]
