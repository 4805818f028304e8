"""The registry that maps an adapter method's name to its spec and its implementation.

Everything the rest of the system knows about a method goes through its `AdapterMethod`: the spec
checks (`validate`), the check against the model's layers (`check_layers`), the per-step hook
(`before_step`) and the export. Generic code never tests a method's name or spec class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from orchestrator.spec import JobSpec

# The method of an adapter section that names none.
DEFAULT_METHOD = "lora"


def _no_problems(*_: Any) -> list[str]:
    return []


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
    # The method's own rules across spec sections, (adapter spec, job spec) → one message per
    # problem, each starting with the field to change ("adapter.start_step: …"). See `validate`.
    spec_problems: Callable[[BaseModel, "JobSpec"], list[str]] = _no_problems
    # (adapter spec, {layer name: (d_in, d_out)} of every adapted layer) → one message per problem
    # (a rank above a layer's dimension), checked by preflight on the model's meta-device copy.
    check_layers: Callable[[BaseModel, dict[str, tuple[int, int]]], list[str]] = _no_problems
    # Called by every rank at the start of each optimizer step (Delta-LoRA's snapshot); `zero3`
    # says whether parameters are partitioned and must be gathered to be read.
    before_step: Optional[Callable[["nn.Module", BaseModel, int, bool], None]] = None
    # The adapter as stock PEFT loads it: ({name: tensor}, PeftConfig). Called with adapter
    # parameters gathered. Default: PEFT's own state dict and config.
    export: Optional[Callable[["nn.Module", BaseModel], tuple[dict[str, "torch.Tensor"], Any]]] = None

    def validate(self, adapter_spec: BaseModel, job_spec: "JobSpec") -> list[str]:
        """Every way this method's adapter does not fit the rest of the job, one message each."""
        problems = []
        if job_spec.optim.lora_plus_ratio is not None and not self.trains_a_and_b:
            both = sorted((m.name for m in all_methods() if m.trains_a_and_b), key=lambda name: name != DEFAULT_METHOD)
            problems.append(
                f"optim.lora_plus_ratio: LoRA+ sets B's learning rate relative to A's, but adapter method "
                f"{self.name!r} does not train both A and B; remove it or use {' / '.join(both)}"
            )
        return problems + self.spec_problems(adapter_spec, job_spec)

    def step_hook(self, model: "nn.Module", adapter_spec: BaseModel, zero3: bool) -> Optional[Callable[[int], None]]:
        """`before_step` bound to one model, or None for a method that has nothing to do per step."""
        if self.before_step is None:
            return None
        before_step = self.before_step
        return lambda step: before_step(model, adapter_spec, step, zero3)


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
    """The default export: the PEFT model's own adapter state dict and config. The tensors are the module's own
    (on CPU): valid while the adapter stays gathered, which is while the checkpoint writes them."""
    from peft import get_peft_model_state_dict

    state = {name: tensor.detach().cpu() for name, tensor in get_peft_model_state_dict(model).items()}
    return state, model.peft_config["default"]
