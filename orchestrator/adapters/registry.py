"""The registry that maps an adapter method's name to its spec and its implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel

if TYPE_CHECKING:
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
