"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen at its random init; only B trains.

The point is activation memory. With A frozen, B's gradient needs only z = A·dropout(x) (r values
per token) and x's gradient needs only the weights, so nothing d-dimensional has to be kept for the
adapter. Freezing A in PEFT's layers gets part of the way; each layer's dropout still keeps a mask of
x. Here the dropout mask is regenerated from a saved seed in backward, so each adapted layer keeps z
and a seed — nothing else.

`project_gradient` applies the LoRA-FA optimizer's projection g_B ← g_B·(A·Aᵀ)⁻¹ / s² as a hook on
B's gradient, before DeepSpeed flattens or partitions anything (PEFT's optimizer pairs A and B by
name, which ZeRO-2's flat groups break). The projection is linear, so it commutes with gradient
accumulation and the all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from orchestrator.adapters.lora import (
    LowRankSpec, check_low_rank_layers, lora_config, lora_layers, require_linear_layers,
)
from orchestrator.adapters.registry import AdapterMethod, register

if TYPE_CHECKING:
    import torch


class LoraFaSpec(LowRankSpec):
    method: Literal["lora_fa"] = "lora_fa"
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input (mask regenerated in backward).")
    project_gradient: bool = Field(
        False, description="Project B's gradient by (A·Aᵀ)⁻¹/s², as PEFT's LoRA-FA optimizer does, but ZeRO-safe."
    )


def projection(lora_a_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """(A·Aᵀ + δI)⁺ / s²: the r×r matrix B's gradient is multiplied by (PEFT's LoRA-FA optimizer)."""
    import torch

    a = lora_a_weight.detach().double()
    gram = a @ a.T + 1e-8 * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return (torch.linalg.pinv(gram) / scaling**2).to(lora_a_weight.dtype)


def attach_lora_fa(model, spec: LoraFaSpec):
    from peft import get_peft_model

    from orchestrator.adapters._seeded_dropout import SeededDropout

    model = get_peft_model(model, lora_config(spec, spec.dropout))
    # PEFT starts an embedding's A at zero and its B at random: the factor to freeze is not A there.
    require_linear_layers(model, "lora_fa")
    for _, layer in lora_layers(model):
        for adapter in layer.lora_A:
            layer.lora_A[adapter].requires_grad_(False)
            if spec.dropout > 0:
                layer.lora_dropout[adapter] = SeededDropout(spec.dropout)
            if spec.project_gradient:
                # A never changes, so the projection is computed once, while A is still whole (before
                # ZeRO-3 partitions it). A non-persistent buffer follows the module across devices.
                layer.register_buffer(
                    "lora_fa_projection", projection(layer.lora_A[adapter].weight, layer.scaling[adapter]), persistent=False
                )
                layer.lora_B[adapter].weight.register_hook(lambda grad, layer=layer: grad @ layer.lora_fa_projection.to(grad.dtype))
    return model


def count_lora_fa_trainable(spec: LoraFaSpec, linear_shapes: list[tuple[int, int]]) -> int:
    return sum(spec.r * d_out for _, d_out in linear_shapes)


register(
    AdapterMethod(
        name="lora_fa", spec=LoraFaSpec, attach=attach_lora_fa, count_trainable=count_lora_fa_trainable,
        trains_a_and_b=False, check_layers=check_low_rank_layers,
    )
)
