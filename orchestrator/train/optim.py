"""The optimizer: AdamW over adapter parameters in named groups (LoRA+ gives B and embeddings their own rates).

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

from orchestrator.errors import JobSpecError
from orchestrator.spec import JobSpec


def param_groups(model: torch.nn.Module, spec: JobSpec) -> list[dict[str, Any]]:
    """Non-empty AdamW groups with a `name`: adapter and no_decay, or with LoRA+ A, embedding, B, B_no_decay.

    LoRA+ groups as PEFT's `create_loraplus_optimizer` does: every parameter of a LoRA embedding
    layer at optim.lora_plus_lr_embedding, lora_B and vectors at lr × ratio, the rest at lr.
    """
    optim = spec.optim
    # Vectors (VeRA's b and d, biases) are not decayed, as in every HF recipe.
    if optim.lora_plus_ratio:
        rates = {"A": (optim.lr, optim.weight_decay), "embedding": (optim.lora_plus_lr_embedding, optim.weight_decay),
                 "B": (optim.lr * optim.lora_plus_ratio, optim.weight_decay), "B_no_decay": (optim.lr * optim.lora_plus_ratio, 0.0)}
    else:
        rates = {"adapter": (optim.lr, optim.weight_decay), "no_decay": (optim.lr, 0.0)}
    members: dict[str, list[torch.nn.Parameter]] = {name: [] for name in rates}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if optim.lora_plus_ratio:
            members[_lora_plus_group(model, name, parameter)].append(parameter)
        else:
            members["no_decay" if parameter.ndim < 2 else "adapter"].append(parameter)
    if optim.lora_plus_ratio and not members["B"]:
        raise JobSpecError("optim.lora_plus_ratio: the adapter has no lora_B outside embedding layers for LoRA+ to speed up")
    # DeepSpeed drops empty groups, which would shift every group index the scheduler relies on.
    return [{"name": name, "params": members[name], "lr": lr, "weight_decay": decay}
            for name, (lr, decay) in rates.items() if members[name]]


def _lora_plus_group(model: torch.nn.Module, name: str, parameter: torch.nn.Parameter) -> str:
    from peft.tuners.lora.layer import Embedding

    # As PEFT: an adapter parameter sits in a dict below its tuner layer (`….lora_embedding_A.default`).
    owner = ".".join(name.split(".")[:-2])
    if owner and isinstance(model.get_submodule(owner), Embedding):
        return "embedding"
    if "lora_B" in name or parameter.ndim == 1:
        return "B" if parameter.ndim >= 2 else "B_no_decay"
    return "A"


def make_optimizer(model: torch.nn.Module, spec: JobSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, spec), lr=spec.optim.lr, betas=spec.optim.betas)


def expected_rates(optimizer: torch.optim.Optimizer) -> list[tuple[str, float]]:
    """(group name, base learning rate) as built, before DeepSpeed touches the optimizer."""
    return [(group["name"], group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]


def rate_metrics(expected: list[tuple[str, float]], current: list[float]) -> dict[str, float]:
    """The learning rates a log line reports: `lr` (the first group's), and with LoRA+ `lr_B` as well."""
    metrics = {"lr": current[0]}
    rates = dict(zip((name for name, _ in expected), current))
    if "B" in rates:
        metrics["lr_B"] = rates["B"]
    return metrics


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
