"""Delta-LoRA's forward as a PEFT LoRA variant (see delta_lora.py). A module of its own because it
needs torch at import, and reading a job spec should not."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _delta_forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
    lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
    scaling = module.scaling[active_adapter]
    result = result + lora_B(lora_A(x)) * scaling
    if module.delta_active:
        # One rank-2r product: [sg(B) | −B_K]·[sg(A); A_K]·x. x keeps its gradient (W_t is part of the
        # model); A and B get none from this term.
        a = torch.cat([lora_A.weight.detach(), module.delta_snapshot_A.to(lora_A.weight.dtype)], dim=0)
        b = torch.cat([lora_B.weight.detach(), -module.delta_snapshot_B.to(lora_B.weight.dtype)], dim=1)
        result = result + F.linear(F.linear(x, a), b) * (module.delta_ratio * scaling)
    return result


class DeltaLoraVariant:
    """A PEFT LoRA variant (the hook PEFT's DoRA uses) whose forward adds the Delta-LoRA term."""

    forward = staticmethod(_delta_forward)

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        raise NotImplementedError("merge a Delta-LoRA adapter through `orchestrator export --merged`")

    merge_unsafe = unmerge = merge_safe
