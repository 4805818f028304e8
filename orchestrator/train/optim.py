"""The optimizer: AdamW over adapter parameters in named groups (LoRA+ gives B its own learning rate).

DeepSpeed wraps this optimizer and rewrites its groups in place (ZeRO-2 flattens each group's
params into one tensor, ZeRO-3 empties them outside step()). What must survive is each group's
learning rate, so after `deepspeed.initialize` we read the rates back from the engine's optimizer
and refuse to train if a group was dropped or its rate changed: LoRA+ silently turning into LoRA is
the failure this guards against.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from orchestrator.spec import JobSpec


def param_groups(model: torch.nn.Module, spec: JobSpec) -> list[dict[str, Any]]:
    """Non-empty AdamW groups with a `name`: adapter | A | B (LoRA+) and no_decay (vectors, biases)."""
    ratio = spec.optim.lora_plus_ratio
    lr, decay = spec.optim.lr, spec.optim.weight_decay
    buckets: dict[str, dict[str, Any]] = {
        "A" if ratio else "adapter": {"params": [], "lr": lr, "weight_decay": decay},
        "B": {"params": [], "lr": lr * (ratio or 1.0), "weight_decay": decay},
        # Vectors (VeRA's b and d, biases) are not decayed, as in every HF recipe.
        "no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2:
            bucket = "no_decay"
        elif ratio and ".lora_B." in name:
            bucket = "B"
        else:
            bucket = "A" if ratio else "adapter"
        buckets[bucket]["params"].append(parameter)
    if ratio and not buckets["B"]["params"]:
        raise RuntimeError("optim.lora_plus_ratio is set but the model has no lora_B parameters")
    # DeepSpeed drops empty groups, which would shift every group index the scheduler relies on.
    return [dict(group, name=name) for name, group in buckets.items() if group["params"]]


def make_optimizer(model: torch.nn.Module, spec: JobSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, spec), lr=spec.optim.lr, betas=spec.optim.betas)


def expected_rates(optimizer: torch.optim.Optimizer) -> list[tuple[str, float]]:
    """(group name, base learning rate) as built, before DeepSpeed touches the optimizer."""
    return [(group["name"], group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]


def check_rates(engine_optimizer, expected: list[tuple[str, float]]) -> None:
    """Raise unless the engine's optimizer still has every group with its base learning rate."""
    groups = engine_optimizer.param_groups
    got = [group.get("initial_lr", group["lr"]) for group in groups]
    want = [rate for _, rate in expected]
    problem = None
    if len(got) != len(want):
        problem = f"{len(want)} parameter groups were built but the engine's optimizer has {len(got)}"
    elif not all(math.isclose(g, w, rel_tol=1e-6) for g, w in zip(got, want)):
        problem = f"base learning rates changed: built {want}, engine has {got}"
    else:
        # The scheduler multiplies every group by the same factor: the current rates keep the ratios.
        current = [group["lr"] for group in groups]
        if current[0] > 0 and not all(math.isclose(c / current[0], w / want[0], rel_tol=1e-6) for c, w in zip(current, want)):
            problem = f"learning-rate ratios changed: built {want}, engine now runs {current}"
    if problem:
        names = [name for name, _ in expected]
        raise RuntimeError(f"DeepSpeed lost the optimizer's per-group learning rates (groups {names}): {problem}")
