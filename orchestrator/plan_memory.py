"""The memory plan: what one worker (one GPU with use_gpu) holds at its peak, by part, from the spec and
the model's config alone. Pure, like plan.py, which shows it.

The parts, in bytes (P base parameters, T trainable, W workers, b bytes per value of the run's precision):
  base weights    P·b, ÷ W under ZeRO-3
  gathered        ZeRO-3 only: the full parameters of the layer being computed and prefetched
  adapter         its weights (T·b, ÷ W under ZeRO-3), gradients (T·b, ÷ W from ZeRO-2) and Adam's state
                  (m and v, and an fp32 master copy unless the run is plain fp32 ZeRO-0: ÷ W from ZeRO-1)
  activations     what backward keeps, per token and decoder layer about (8·h + 3.5·i)·b (h hidden size, i the
                  MLP's width, active experts' summed for a mixture of experts; 2·i for an MLP without a gate),
                  plus dropout's copies on the adapter's inputs and the loss's fp32 logits; with gradient
                  checkpointing each layer keeps only its input (h·b) and one layer is recomputed at a time
The activation coefficients were measured on Llama shapes (saved tensors deduplicated by storage, CPU, fp32 and
bf16) and the totals checked against workers' measured peak memory (bench/memory.py, docs/scaling.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

# Memory of one accelerator by Ray's accelerator_type name, GB (vendor data sheets; the smaller variant when
# the name does not say which).
ACCELERATOR_MEMORY_GB = {"A100-80G": 80, "A100-40G": 40, "A100": 40, "H100": 80, "H200": 141, "B200": 180,
                         "L40S": 48, "L4": 24, "A10G": 24, "V100": 16, "T4": 16}
GB = 1e9


@dataclass
class ModelShape:
    """The dimensions the estimate needs, read from any causal LM's config."""

    hidden: int
    layers: int
    vocab: int
    mlp_width: int  # per token: the active experts' widths summed for a mixture of experts
    gated_mlp: bool


def model_shape(config: Any) -> ModelShape:
    hidden = config.hidden_size
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    if getattr(config, "moe_intermediate_size", None):
        width = config.moe_intermediate_size * top_k + (getattr(config, "shared_expert_intermediate_size", None) or 0)
    else:
        width = next((value for name in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
                      if (value := getattr(config, name, None))), 4 * hidden) * top_k
    activation = str(getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "")
    gated = activation in ("silu", "swiglu") or "gelu_pytorch_tanh" in activation
    return ModelShape(hidden, config.num_hidden_layers, config.vocab_size, width, gated)


@dataclass
class MemoryEstimate:
    """One worker's memory at its peak, in bytes, by part; `limit` is the accelerator's memory when known."""

    base_weights: int
    gathered: int
    adapter: int
    activations: int
    device: str  # "GPU" or "CPU worker"
    limit: Optional[int] = None
    remedies: str = ""  # what would lower it, for the warning

    @property
    def total(self) -> int:
        return self.base_weights + self.gathered + self.adapter + self.activations

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {"per": self.device, "total_gb": _gb(self.total), "base_weights_gb": _gb(self.base_weights),
                "zero3_gathered_gb": _gb(self.gathered), "adapter_and_optimizer_gb": _gb(self.adapter),
                "activations_gb": _gb(self.activations), "limit_gb": _gb(self.limit) if self.limit else None}

    def line(self) -> str:
        parts = [f"base {_size(self.base_weights)}"] + ([f"ZeRO-3 gathered {_size(self.gathered)}"] if self.gathered else [])
        parts += [f"adapter and optimizer {_size(self.adapter)}", f"activations {_size(self.activations)}"]
        limit = f" of {_size(self.limit)}" if self.limit else ""
        return f"{_size(self.total)} per {self.device}{limit} ({' + '.join(parts)})"

    def warning(self) -> Optional[str]:
        if self.fits:
            return None
        return f"memory: the estimate per {self.device}, {_size(self.total)}, exceeds its {_size(self.limit)}; {self.remedies}"


def _gb(value: int) -> float:
    return round(value / GB, 3)


def _size(value: int) -> str:
    return f"{value / GB:.1f} GB" if value >= GB else f"{value / 1e6:.1f} MB"


def accelerator_memory(spec) -> Optional[int]:
    scaling = spec.scaling
    if not scaling.use_gpu:
        return None
    if scaling.gpu_memory_gb:
        return int(scaling.gpu_memory_gb * GB)
    known = ACCELERATOR_MEMORY_GB.get(scaling.accelerator_type or "")
    return int(known * GB) if known else None


def zero3_live_parameters(config: Any) -> int:
    """How many base parameters ZeRO-3 keeps gathered at once: one decoder layer's (its modules are gathered
    one by one, the next prefetched while one computes), not DeepSpeed's default 1e9, which keeps a model under
    a billion parameters gathered whole between forward and backward, undoing the partition."""
    shape = model_shape(config)
    return 4 * shape.hidden**2 + (3 if shape.gated_mlp else 2) * shape.hidden * shape.mlp_width


def estimate_memory(spec, base_parameters: int, trainable_parameters: int, model_config: Any, value_bytes: int) -> MemoryEstimate:
    stage, workers = spec.deepspeed.zero_stage, spec.scaling.num_workers
    base = base_parameters * value_bytes // (workers if stage == 3 else 1)
    gathered = min(base_parameters, zero3_live_parameters(model_config)) * value_bytes if stage == 3 and workers > 1 else 0
    trained = trainable_parameters
    weights = trained * value_bytes // (workers if stage == 3 else 1)
    gradients = trained * value_bytes // (workers if stage >= 2 else 1)
    master = 4 if (value_bytes < 4 or stage >= 1) else 0
    optimizer = trained * (8 + master) // (workers if stage >= 1 else 1)
    return MemoryEstimate(base_weights=base, gathered=gathered, adapter=weights + gradients + optimizer,
                          activations=activation_bytes(spec, model_shape(model_config), value_bytes),
                          device="GPU" if spec.scaling.use_gpu else "CPU worker", limit=accelerator_memory(spec),
                          remedies=_remedies(spec))


def _remedies(spec) -> str:
    remedies = ["deepspeed.zero_stage: 3" if spec.deepspeed.zero_stage < 3 else "more workers (scaling.num_workers)"]
    if not spec.train.gradient_checkpointing:
        remedies.append("train.gradient_checkpointing: true")
    remedies.append("a smaller train.batch_size or data.max_length")
    return "try " + ", ".join(remedies)


def activation_bytes(spec, shape: ModelShape, value_bytes: int) -> int:
    """Peak bytes of what forward and backward keep for one micro-batch of batch_size × max_length tokens."""
    tokens = spec.train.batch_size * spec.data.max_length
    h, width = shape.hidden, shape.mlp_width
    per_layer = (8 * h + (3.5 if shape.gated_mlp else 2) * width) * value_bytes
    if value_bytes < 4:  # the norms compute in fp32 whatever the precision
        per_layer += 4 * h * 4
    dropout = getattr(spec.adapter, "dropout", 0.0)
    if dropout > 0:  # each adapted layer keeps its own dropped copy of its input and a one-byte mask
        per_layer += (value_bytes + 1) * (6 * h + width)
    if spec.deepspeed.zero_stage == 3 and (dropout > 0 or spec.adapter.target_modules != "all-linear"):
        # ZeRO-3's linear keeps every linear layer's input for backward, also where no adapter keeps it already.
        per_layer += (3 * h + width) * value_bytes
    # The loss: the logits, their fp32 copy and log-softmax, and their gradient in backward.
    head = shape.vocab * (8 + value_bytes)
    if spec.train.gradient_checkpointing:
        # Each layer's input, plus whichever is larger: the loss's backward, or one layer recomputed with its gradients.
        return int(tokens * (shape.layers * h * value_bytes + max(head, 1.3 * per_layer)))
    return int(tokens * (1.05 * shape.layers * per_layer + head))
