"""Pure planning: spec (+ model config) → DeepSpeed config, worker resources, trainable-parameter estimate.

No Ray, no I/O: everything here is a function of its arguments and unit-tested as such.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters import get_method
from orchestrator.errors import JobSpecError
from orchestrator.spec import JobSpec


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
    """The DeepSpeed config for this job; `deepspeed.config` in the spec is merged over it last."""
    train, stage = spec.train, spec.deepspeed.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if stage == 3:
        # Adapter weights are gathered explicitly at save time; never consolidate the frozen base.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * spec.scaling.num_workers,
        "zero_optimization": zero,
        # Our optimizer is a plain torch AdamW with per-group learning rates (LoRA+ needs them).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": spec.scaling.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.optim.grad_clip > 0:
        config["gradient_clipping"] = spec.optim.grad_clip
    return deep_merge(config, spec.deepspeed.config)


def algorithm_problems(spec: JobSpec) -> list[str]:
    """Ways the merged DeepSpeed config would silently change the training algorithm, one line each.

    Every method here relies on our optimizer (LoRA+'s groups, the no-decay group, LoRA-FA's
    projection hook) and our scheduler, and the ZeRO checks in this module use `deepspeed.zero_stage`.
    """
    raw = spec.deepspeed.config
    problems = []
    for key, ours in (("optimizer", "optim.lr / optim.lora_plus_ratio"), ("scheduler", "optim.scheduler")):
        if key in raw:
            problems.append(
                f"deepspeed.config.{key}: DeepSpeed would build its own {key} and drop {ours} (and LoRA+'s "
                f"per-group learning rates); remove it and set {ours} instead"
            )
    raw_stage = (raw.get("zero_optimization") or {}).get("stage")
    if raw_stage is not None and raw_stage != spec.deepspeed.zero_stage:
        problems.append(
            f"deepspeed.config.zero_optimization.stage: {raw_stage} contradicts deepspeed.zero_stage "
            f"({spec.deepspeed.zero_stage}); set deepspeed.zero_stage only"
        )
    return problems


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """One worker's Ray resources; an accelerator type is Ray's `accelerator_type:<name>` marker resource."""
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker
    if spec.scaling.accelerator_type:
        resources[f"accelerator_type:{spec.scaling.accelerator_type}"] = 0.001
    return resources


def cluster_needs(spec: JobSpec) -> dict[str, float]:
    per_worker = worker_resources(spec)
    return {name: amount * spec.scaling.num_workers for name, amount in per_worker.items()}


def _matches(module_name: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return True
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def adapted_linear_shapes(model_config: Any, target_modules: list[str] | str) -> dict[str, tuple[int, int]]:
    """{module name: (d_in, d_out)} of the linear layers an adapter would wrap, from the config alone.

    The model is built on the meta device: no memory, no weights, exact shapes for any architecture.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    output_layer = model.get_output_embeddings()
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_layer and _matches(name, target_modules)
    }


def count_base_parameters(model_config: Any) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


@dataclass
class Plan:
    spec: JobSpec
    deepspeed: dict[str, Any]
    worker_resources: dict[str, float]
    cluster_needs: dict[str, float]
    global_batch: int
    adapted_layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    base_parameters: int = 0
    trainable_parameters: int = 0

    @property
    def trainable_percent(self) -> float:
        total = self.base_parameters + self.trainable_parameters
        return 100.0 * self.trainable_parameters / total if total else 0.0


def build_plan(spec: JobSpec, model_config: Any | None = None) -> Plan:
    problems = algorithm_problems(spec)
    if problems:
        raise JobSpecError("; ".join(problems))
    plan = Plan(
        spec=spec,
        deepspeed=deepspeed_config(spec),
        worker_resources=worker_resources(spec),
        cluster_needs=cluster_needs(spec),
        global_batch=spec.train.batch_size * spec.train.grad_accum * spec.scaling.num_workers,
    )
    if model_config is not None:
        method = get_method(spec.adapter.method)
        plan.adapted_layers = adapted_linear_shapes(model_config, spec.adapter.target_modules)
        plan.base_parameters = count_base_parameters(model_config)
        plan.trainable_parameters = method.count_trainable(spec.adapter, list(plan.adapted_layers.values()))
    return plan
