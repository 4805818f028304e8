"""Delta-LoRA (Zi et al. 2023): LoRA whose base weight also moves by the change of B·A.

The rule, exactly as the paper's Algorithm 1 states it (iterations t = 0, 1, …, 0-indexed; A_t, B_t are the
values iteration t starts from, A_{t+1}, B_{t+1} those its optimizer step produces):

    if t > K:  W ← W + λ·s·(B_{t+1}A_{t+1} − B_tA_t)

So the first W update happens at iteration K+1, and the W that iteration t ≥ K+1 computes with telescopes to
W_t = W0 + λ·s·(B_tA_t − B_{K+1}A_{K+1}) (W_t = W0 up to iteration K+1). The same model is computed here
without ever writing W0:

    h = W0·x + s·B·A·x + λ·s·(sg(B·A) − B_s·A_s)·x        (sg = stop-gradient)

with the snapshot (A_s, B_s) = (A_{K+1}, B_{K+1}) taken at the start of iteration K+1 (`start_step` is K). It is exactly the paper's algorithm (A and B get the same
gradients, W's contribution is the same), it is ZeRO-safe (W0 is never modified, no d×d delta is ever
materialised) and the checkpoint stays adapter-sized. It exports as a plain rank-2r LoRA:
B' = [(1+λ)·s·B | −λ·s·B_K], A' = [A; A_K], scale 1. The adapter path has no dropout, as in the paper.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from orchestrator.adapters.lora import (
    LowRankSpec, check_low_rank_layers, count_low_rank_trainable, lora_config, lora_layers, require_linear_layers,
)
from orchestrator.adapters.registry import AdapterMethod, peft_export, register

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec


class DeltaLoraSpec(LowRankSpec):
    method: Literal["delta_lora"] = "delta_lora"
    update_ratio: float = Field(2.0, ge=0.0, description="λ: how far W follows the change of B·A (0 = plain LoRA).")
    start_step: int = Field(
        500, ge=0, description="K: W follows B·A from iteration K+1 on (the paper's t > K, iterations counted from 0)."
    )


def attach_delta_lora(model, spec: DeltaLoraSpec):
    import deepspeed
    import torch
    from peft import get_peft_model

    from orchestrator.adapters._delta_lora_variant import DeltaLoraVariant

    model = get_peft_model(model, lora_config(spec, dropout=0.0))
    require_linear_layers(model, "delta_lora")
    for _, layer in lora_layers(model):
        lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
        # Buffers, not parameters: ZeRO-3 never partitions them, and the engine checkpoint keeps them.
        layer.register_buffer("delta_snapshot_A", torch.zeros_like(lora_A.weight))
        layer.register_buffer("delta_snapshot_B", torch.zeros_like(lora_B.weight))
        layer.delta_ratio, layer.delta_active = spec.update_ratio, False
        layer.lora_variant["default"] = DeltaLoraVariant()
        # The forward reads A's and B's weights outside their own modules' forward: under ZeRO-3 the
        # layer must gather them for its whole forward.
        deepspeed.zero.register_external_parameter(layer, lora_A.weight)
        deepspeed.zero.register_external_parameter(layer, lora_B.weight)
    return model


def delta_lora_before_step(model, spec: DeltaLoraSpec, step: int, zero3: bool) -> None:
    import torch

    layers = [layer for _, layer in lora_layers(model)]
    snapshot_step = first_update_step(spec)
    if step == snapshot_step:
        weights = [w for layer in layers for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
        if zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(weights, modifier_rank=None)
        else:
            gather = nullcontext()
        with gather, torch.no_grad():
            for layer in layers:
                layer.delta_snapshot_A.copy_(layer.lora_A["default"].weight)
                layer.delta_snapshot_B.copy_(layer.lora_B["default"].weight)
    elif step > snapshot_step and not getattr(model, "_delta_snapshot_checked", False):
        # A resumed run gets the snapshot from the engine checkpoint; A_K is a random init, never zero.
        if any(not layer.delta_snapshot_A.any() for layer in layers):
            raise RuntimeError(f"Delta-LoRA snapshot of step {snapshot_step} is missing from the resumed state")
        model._delta_snapshot_checked = True
    for layer in layers:
        # At iteration K+1 itself the term is sg(BA) − B_sA_s = 0; it is on from there so that a checkpoint
        # taken after iteration K+1 exports the snapshot it depends on.
        layer.delta_active = step >= snapshot_step


def first_update_step(spec: DeltaLoraSpec) -> int:
    """The first iteration after which W moves (the paper's t > K), where the snapshot is taken."""
    return spec.start_step + 1


def delta_lora_spec_problems(spec: DeltaLoraSpec, job: JobSpec) -> list[str]:
    # Iterations end at max_steps - 1: the W update must start before that.
    if first_update_step(spec) >= job.train.max_steps:
        return [
            f"adapter.start_step: {spec.start_step} leaves no iteration after it below train.max_steps "
            f"({job.train.max_steps}), so the Delta-LoRA update would never start; lower it (about a tenth "
            f"of the run is typical)"
        ]
    return []


def export_delta_lora(model, spec: DeltaLoraSpec):
    """The equivalent rank-2r LoRA (scale 1), loadable by stock PEFT."""
    import torch

    state, config = peft_export(model, spec)
    # PEFT's state dict takes every buffer of a LoRA layer; the snapshot lives on in the rank-2r pair.
    state = {name: tensor for name, tensor in state.items() if ".delta_snapshot_" not in name}
    for name, layer in lora_layers(model):
        scaling = layer.scaling["default"]
        ratio = spec.update_ratio if layer.delta_active else 0.0
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        a, b = state[key_a], state[key_b]
        state[key_a] = torch.cat([a, layer.delta_snapshot_A.cpu().to(a.dtype)], dim=0)
        state[key_b] = torch.cat([(1 + ratio) * scaling * b, -ratio * scaling * layer.delta_snapshot_B.cpu().to(b.dtype)], dim=1)
    config = copy.deepcopy(config)
    config.r, config.lora_alpha, config.use_rslora = 2 * spec.r, 2 * spec.r, False
    return state, config


register(
    AdapterMethod(
        name="delta_lora", spec=DeltaLoraSpec, attach=attach_delta_lora, count_trainable=count_low_rank_trainable,
        spec_problems=delta_lora_spec_problems, check_layers=check_low_rank_layers,
        before_step=delta_lora_before_step, export=export_delta_lora,
    )
)
