"""Pure planning: spec (+ model config) → DeepSpeed config, worker resources, trainable-parameter estimate.

No Ray, no I/O: everything here is a function of its arguments and unit-tested as such.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters import get_method
from orchestrator.errors import JobSpecError, PreflightError
from orchestrator.plan_memory import MemoryEstimate, estimate_memory, model_shape, zero3_live_parameters
from orchestrator.spec import JobSpec


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def precision(spec: JobSpec) -> str:
    """The run's precision, "bf16" or "fp32": train.precision, where auto means bf16 on GPUs and fp32 on CPU."""
    if spec.train.precision == "auto":
        return "bf16" if spec.scaling.use_gpu else "fp32"
    return spec.train.precision


def value_bytes(spec: JobSpec) -> int:
    """Bytes of one base weight or activation value in the run's precision."""
    return 2 if precision(spec) == "bf16" else 4


def deepspeed_config(spec: JobSpec, model_config: Any | None = None, trainable_parameters: int = 0) -> dict[str, Any]:
    """The DeepSpeed config for this job; `deepspeed.config` in the spec is merged over it last. With the
    model's config, ZeRO-3 keeps only about two decoder layers gathered at a time (see plan_memory); with the
    adapter's size, ZeRO's gradient bucket holds the adapter (under ZeRO-2 and 3 a worker's share of it, and with
    the model's config one decoder layer's adapter gradients at most), not DeepSpeed's default 5e8 values (1 GB
    of GPU memory in bf16 that an adapter never fills)."""
    train, stage = spec.train, spec.deepspeed.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if stage >= 1 and trainable_parameters:
        # ZeRO-2 and 3 keep each worker's share of the gradients: a bucket of the whole adapter would hold (and
        # its reduce-scatter copy) all of them on every worker. Backward produces them a decoder layer at a time: a
        # bucket of one layer's adapter gradients is reduced as each layer's backward ends, where one of the share
        # held many layers' until it filled (one collective per layer instead of one per share; the 300M memory
        # bench's ZeRO-3 worker peaked 7 MB lower).
        bucket = -(-trainable_parameters // spec.scaling.num_workers) if stage >= 2 else trainable_parameters
        if stage >= 2 and model_config is not None:
            bucket = min(bucket, -(-trainable_parameters // model_shape(model_config).layers))
        zero["reduce_bucket_size"] = min(500_000_000, bucket)
    if stage == 3:
        # Adapter weights are gathered explicitly at save time; never consolidate the frozen base.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if model_config is not None:
            live = zero3_live_parameters(model_config)
            # On CPU DeepSpeed's streams are no-ops: gathering ahead (prefetch) or keeping the last layer
            # gathered from forward into backward (reuse distance) overlaps nothing, it only holds more.
            ahead = spec.scaling.use_gpu
            zero.update(stage3_max_live_parameters=live, stage3_max_reuse_distance=live if ahead else 0,
                        stage3_prefetch_bucket_size=live // 2 if ahead else 0)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * spec.scaling.num_workers,
        "zero_optimization": zero,
        # Our optimizer is a plain torch AdamW with per-group learning rates (LoRA+ needs them).
        "zero_allow_untested_optimizer": True,
        # bf16: the base and the forward in bf16; DeepSpeed keeps the adapter's fp32 master copy in its optimizer.
        "bf16": {"enabled": precision(spec) == "bf16"},
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


def cluster_needs(spec: JobSpec, workers: int | None = None) -> dict[str, float]:
    """What `workers` workers take from the cluster (num_workers by default; an elastic run starts with min_workers)."""
    per_worker = worker_resources(spec)
    return {name: amount * (workers or spec.scaling.num_workers) for name, amount in per_worker.items()}


def _matches(module_name: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return True
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


@dataclass
class AdapterEstimate:
    """What attaching the spec's adapter does to the model, worked out on the meta device."""

    base_parameters: int
    trainable_parameters: int
    # {module name: (d_in, d_out)} of every adapted layer, as PEFT's tuner layer records them
    # (an embedding: (num_embeddings, embedding_dim)).
    adapted_layers: dict[str, tuple[int, int]]
    # {optimizer group name: base learning rate}, from the optimizer's own grouping rule.
    learning_rates: dict[str, float]


def estimate_adapter(spec: JobSpec, model_config: Any) -> AdapterEstimate:
    """Build the model on the meta device (no memory, no weights) and attach the adapter for real.

    The counts are then PEFT's own for any architecture, target list and method: nothing here
    re-derives which layers a method adapts or how many parameters it adds.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.train.optim import param_groups

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    base_parameters = sum(p.numel() for p in model.parameters())
    targets = spec.adapter.target_modules
    if not any(_matches(name, targets) for name, _ in model.named_modules()):
        raise PreflightError(
            f"adapter.target_modules: {targets} match no linear layer, embedding or Conv1D of the model "
            f"(its adaptable layers: {', '.join(_adaptable_layer_names(model))})"
        )
    model.requires_grad_(False)
    # Attached outside the meta-device context: whatever the method imports on first use (PEFT,
    # DeepSpeed) must not create its module-level tensors on the meta device. PEFT moves each new
    # adapter layer to its base layer's device, so the adapter ends up on meta all the same.
    try:
        with warnings.catch_warnings():  # PEFT's own deprecation notices are not for the user of `plan`
            warnings.simplefilter("ignore", FutureWarning)
            model = get_method(spec.adapter.method).attach(model, spec.adapter)
    except (ValueError, TypeError) as error:  # PEFT's way of refusing a layer or a combination
        reason = _one_line(str(error)) or type(error).__name__
        raise PreflightError(f"adapter: {spec.adapter.method} cannot be attached to target_modules {targets} ({reason})") from None
    return AdapterEstimate(
        base_parameters=base_parameters,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        adapted_layers=_adapted_layers(model),
        learning_rates={group["name"]: group["lr"] for group in param_groups(model, spec)},
    )


def _one_line(message: str, limit: int = 240) -> str:
    """PEFT's message on one line: a module's repr inside it spans several."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _adapted_layers(peft_model: Any) -> dict[str, tuple[int, int]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: (layer.in_features, layer.out_features)
        for name, layer in peft_model.get_base_model().named_modules()
        if isinstance(layer, BaseTunerLayer)
    }


def _adaptable_layer_names(model: Any) -> list[str]:
    """The distinct last name parts of the layers a target list can name (for the error message)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)})


@dataclass
class Plan:
    spec: JobSpec
    deepspeed: dict[str, Any]
    worker_resources: dict[str, float]
    cluster_needs: dict[str, float]
    global_batch: int
    precision: str = "fp32"
    # The fields of AdapterEstimate, filled when the plan is built with the model's config.
    base_parameters: int = 0
    trainable_parameters: int = 0
    adapted_layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    memory: MemoryEstimate | None = None  # per worker (per GPU with use_gpu), with the model's config

    @property
    def trainable_percent(self) -> float:
        total = self.base_parameters + self.trainable_parameters
        return 100.0 * self.trainable_parameters / total if total else 0.0

    @property
    def warnings(self) -> list[str]:
        """What may fail once the job runs, one line each (the memory estimate above the accelerator's)."""
        warning = self.memory.warning() if self.memory else None
        return [warning] if warning else []

    def to_dict(self) -> dict[str, Any]:
        """What `orchestrator plan --json` prints: the adapter, resources, batch, learning rates per
        optimizer group (as the workers will build them), parameter counts, precision, the memory estimate per
        worker, warnings and the DeepSpeed config."""
        return {
            "job": self.spec.name,
            "adapter": self.spec.adapter.model_dump(mode="json"),
            "workers": _workers_shown(self.spec),
            "resources_per_worker": self.worker_resources,
            "cluster_needs": self.cluster_needs,
            "global_batch": self.global_batch,
            "learning_rates": self.learning_rates,
            "adapted_layers": len(self.adapted_layers),
            "trainable_parameters": self.trainable_parameters,
            "base_parameters": self.base_parameters,
            "trainable_percent": round(self.trainable_percent, 4),
            "precision": self.precision,
            "memory": self.memory.to_dict() if self.memory else None,
            "warnings": self.warnings,
            "deepspeed": self.deepspeed,
        }

    def summary(self) -> str:
        """`to_dict` for people: one `key: value` line each, then the DeepSpeed config as indented JSON."""
        shown = {key: value for key, value in self.to_dict().items() if key not in ("deepspeed", "memory", "warnings")}
        if self.memory:
            shown["memory"] = self.memory.line()
        lines = [f"{key:>22}: {value}" for key, value in shown.items()]
        lines += [f"{'warning':>22}: {warning}" for warning in self.warnings]
        lines.append(f"{'deepspeed':>22}:")
        lines.append("  " + json.dumps(self.deepspeed, indent=2).replace("\n", "\n  "))
        return "\n".join(lines)


def _workers_shown(spec: JobSpec) -> int | str:
    low, high = spec.scaling.worker_range
    return high if low == high else f"{low}-{high} (elastic)"


def build_plan(spec: JobSpec, model_config: Any | None = None) -> Plan:
    problems = algorithm_problems(spec)
    if problems:
        raise JobSpecError("; ".join(problems))
    estimate = estimate_adapter(spec, model_config) if model_config is not None else None
    memory = None
    if estimate is not None:
        memory = estimate_memory(spec, estimate.base_parameters, estimate.trainable_parameters, model_config, value_bytes(spec))
    return Plan(
        spec=spec,
        deepspeed=deepspeed_config(spec, model_config, estimate.trainable_parameters if estimate else 0),
        worker_resources=worker_resources(spec),
        cluster_needs=cluster_needs(spec),
        global_batch=spec.train.batch_size * spec.train.grad_accum * spec.scaling.num_workers,
        precision=precision(spec),
        memory=memory,
        **(vars(estimate) if estimate else {}),
    )
