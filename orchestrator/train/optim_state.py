"""The training state of an adapter in a form that does not depend on the worker count: every trainable
parameter's fp32 master value and optimizer moments, whole, by parameter name; the optimizer's step; the LR
schedule; the adapter's buffers (Delta-LoRA's snapshot). Adapter-sized (12 bytes per trainable parameter for
AdamW), written by rank 0, so a run resumes on any number of workers and under any ZeRO stage.

DeepSpeed's own checkpoint holds each rank's optimizer partition, which only the same world size can load
(its universal-checkpoint conversion is an offline step for the whole model). Here the whole values are read
and written through DeepSpeed's tensor-fragment API (`safe_get_full_*` / `safe_set_full_*`), which every
stage implements; ZeRO-0 in fp32 keeps no fragments (the parameter is its own master) and is read directly.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.safetensors"
META_FILE = "state.json"


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (inside its ZeRO/bf16 wrapper, or the client's own at ZeRO-0 fp32)."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper)


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _has_fragments(parameter) -> bool:
    """Whether DeepSpeed keeps this parameter's master and moments in partitions (ZeRO-1/2/3, bf16). Every such
    parameter has the attribute, None on a rank that holds no part of it: the full-value calls are collectives
    that every rank must make."""
    return hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping")


def _moment_keys(engine) -> list[str]:
    """The per-parameter tensors of the optimizer's state (AdamW: exp_avg, exp_avg_sq)."""
    optimizer = _base_optimizer(engine)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter) or {}
            keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == parameter.shape and k != "step")
            if keys:
                return keys
    return ["exp_avg", "exp_avg_sq"]


def _optimizer_step(engine) -> float:
    optimizer = _base_optimizer(engine)
    for state in optimizer.state.values():
        if "step" in state:
            step = state["step"]
            return float(step.item() if torch.is_tensor(step) else step)
    return 0.0


def gather_training_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by name, everything else) of the engine's adapter training state, whole on every rank.
    Collective under ZeRO-1/2/3 and bf16: every rank calls it, in the same parameter order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer, keys = _base_optimizer(engine), _moment_keys(engine)
    if optimizer.state:
        _link_fragments(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, parameter in _trainable(engine):
        if _has_fragments(parameter):
            tensors[f"param/{name}"] = safe_get_full_fp32_param(parameter)
            for key in keys:
                tensors[f"{key}/{name}"] = safe_get_full_optimizer_state(parameter, key)
        else:
            state = optimizer.state.get(parameter, {})
            tensors[f"param/{name}"] = parameter.detach().float()
            for key in keys:
                tensors[f"{key}/{name}"] = state.get(key, torch.zeros_like(parameter)).detach()
    for name, buffer in _persistent_buffers(engine.module):
        tensors[f"buffer/{name}"] = buffer.detach()
    # Copies: a buffer shared between layers (VeRA's) would otherwise be one storage under two names.
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
    meta = {"optimizer_step": _optimizer_step(engine), "moments": keys,
            "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}
    return tensors, meta


def save_training_state(engine, directory: Path, is_writer: bool) -> None:
    """Write the state to `directory` (rank 0); collective like gather_training_state."""
    from safetensors.torch import save_file

    tensors, meta = gather_training_state(engine)
    if not is_writer:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / STATE_FILE), metadata={"format": "pt"})
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def load_training_state(engine, directory: Path) -> None:
    """Put the state `save_training_state` wrote into a freshly built engine, whatever the worker count and
    ZeRO stage it was written under. Collective: every rank reads the same files."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / STATE_FILE))
    meta = json.loads((directory / META_FILE).read_text())
    restore_training_state(engine, tensors, meta)


def restore_training_state(engine, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trainable = _trainable(engine)
    missing = [name for name, _ in trainable if f"param/{name}" not in tensors]
    if missing:
        raise RuntimeError(f"the checkpoint's training state lacks {len(missing)} trainable parameters "
                           f"(first: {missing[0]}): it was written for another adapter")
    optimizer = _ensure_optimizer_state(engine, meta["moments"])
    step = meta["optimizer_step"]
    for name, parameter in trainable:
        master = tensors[f"param/{name}"]
        if _has_fragments(parameter):
            safe_set_full_fp32_param(parameter, master.to(torch.float32))
            for key in meta["moments"]:
                safe_set_full_optimizer_state(parameter, tensors[f"{key}/{name}"].to(torch.float32), key)
        else:
            state = optimizer.state[parameter]
            for key in meta["moments"]:
                state[key].copy_(tensors[f"{key}/{name}"])
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.tensor(step, dtype=torch.float32) if torch.is_tensor(state["step"]) else step
    _set_module_values(engine, [(p, tensors[f"param/{n}"]) for n, p in trainable])
    buffers = dict(_persistent_buffers(engine.module))
    with torch.no_grad():
        for name, buffer in buffers.items():
            if f"buffer/{name}" in tensors:
                buffer.copy_(tensors[f"buffer/{name}"])
    scheduler = engine.lr_scheduler
    if meta.get("scheduler") is not None and scheduler is not None:
        _load_schedule_keeping_base_rates(scheduler, meta["scheduler"])
    engine.global_steps = int(step)


def _load_schedule_keeping_base_rates(scheduler, state: dict) -> None:
    """The schedule's position (warm-up, decay) from the checkpoint, its base rates from this run's spec. They are
    the same on a plain resume; a PBT trial continues another trial's checkpoint with perturbed rates, and the
    checkpoint's own base rates would silently undo the perturbation."""
    built = list(scheduler.base_lrs)
    scheduler.load_state_dict(state)
    saved_base, saved_last = list(scheduler.base_lrs), list(scheduler.get_last_lr())
    rates = [new * (last / old if old else 1.0) for new, old, last in zip(built, saved_base, saved_last)]
    scheduler.base_lrs, scheduler._last_lr = built, rates
    # A scheduler sets the rates when it steps; loading its state alone leaves the groups at step 0's.
    for group, base, rate in zip(scheduler.optimizer.param_groups, built, rates):
        group["initial_lr"], group["lr"] = base, rate


def _ensure_optimizer_state(engine, moments: list[str]) -> torch.optim.Optimizer:
    """Allocate the optimizer's state as its first step would (AdamW creates it lazily), so that the restored
    values have somewhere to go; DeepSpeed's fragments are then pointed at it."""
    optimizer = _base_optimizer(engine)
    for parameter in _stepped_tensors(engine):
        state = optimizer.state[parameter]
        if not state:
            state["step"] = torch.tensor(0.0)
            for key in moments:
                state[key] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
    _link_fragments(engine)
    return optimizer


def _stepped_tensors(engine) -> list[torch.Tensor]:
    """What the torch optimizer steps: the parameters at ZeRO-0 fp32, else DeepSpeed's flat fp32 partitions (ZeRO-3
    lists one per sub-group, of which its param groups show one at a time)."""
    wrapper, seen, found = engine.optimizer, set(), []
    groups = [p for group in _base_optimizer(engine).param_groups for p in group["params"]]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        groups += list(getattr(wrapper, name, None) or [])
    for tensor in groups:
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            found.append(tensor)
    return found


def _link_fragments(engine) -> None:
    """Point every parameter's fragment at the optimizer state (ZeRO-1/2, bf16). DeepSpeed links them once, after
    the step of the first param group, when the other groups' state does not exist yet: with several groups
    (LoRA+, no-decay) their moments would be unreadable."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _set_module_values(engine, values: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """The module's (low-precision) copies follow the restored masters: gathered and written by rank 0 under
    ZeRO-3 (every rank holds the same values), written in place elsewhere (views into DeepSpeed's flat buffers)."""
    parameters = [p for p, _ in values]
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)
    else:
        gather = nullcontext()
    with gather, torch.no_grad():
        for parameter, value in values:
            parameter.data.copy_(value.to(parameter.dtype).view(parameter.shape))


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers a state dict keeps (Delta-LoRA's snapshot, VeRA's projections, a base's persistent buffers)."""
    found = []
    for module_name, child in module.named_modules():
        for name, buffer in child.named_buffers(recurse=False):
            if buffer is not None and name not in child._non_persistent_buffers_set:
                found.append((f"{module_name}.{name}" if module_name else name, buffer))
    return found
