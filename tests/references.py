"""Independent references for every adapter method: built from PEFT's own configs and optimizers and from
the papers, never from the project's adapter code (`orchestrator.adapters`, `train.optim`, `train.model`).

- LoRA / rsLoRA / Delta-LoRA's low-rank pair: `peft.LoraConfig` (scale α/r, or α/√r with rsLoRA).
- LoRA+: `peft.optimizers.create_loraplus_optimizer` groups and rates.
- LoRA-FA with the projected gradient: `peft.optimizers.create_lorafa_optimizer` (A frozen, B's
  gradient times (A·Aᵀ)⁻¹/s²); without projection, PEFT LoRA with A frozen and AdamW on B.
- VeRA: `peft.VeraConfig` with the same PRNG key.
- Delta-LoRA: the paper's Algorithm 1 written out on a PEFT LoRA model: after the optimizer step of
  iteration t (0-indexed), if t > K: W ← W + λ·(α/r)·(B⁽ᵗ⁺¹⁾A⁽ᵗ⁺¹⁾ − B⁽ᵗ⁾A⁽ᵗ⁾), W written explicitly.

A reference starts from the trained model's initial adapter values (copied by name), so that the random
init of A is shared; the init itself is asserted separately (tests/test_adapters.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def reference_model(base: torch.nn.Module, adapter: dict[str, Any]) -> torch.nn.Module:
    """`base` (frozen) wrapped by stock PEFT as `adapter` (a spec's `adapter` section, as a dict) describes."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    base.requires_grad_(False)
    method = adapter["method"]
    targets = adapter.get("target_modules", ["q_proj", "v_proj"])
    if method == "vera":
        config = VeraConfig(r=adapter.get("r", 256), target_modules=targets, projection_prng_key=adapter.get("projection_prng_key", 0),
                            d_initial=adapter.get("d_initial", 0.1), save_projection=True, vera_dropout=adapter.get("dropout", 0.0))
    else:
        dropout = 0.0 if method == "delta_lora" else adapter.get("dropout", 0.05)  # the paper has none on its path
        config = LoraConfig(r=adapter.get("r", 8), lora_alpha=adapter.get("alpha", 16.0), target_modules=targets,
                            use_rslora=adapter.get("rslora", False), lora_dropout=dropout)
    model = get_peft_model(base, config)
    if method == "lora_fa":
        for name, parameter in model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
    return model


def copy_initial_adapter(source_state: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
    """Load the adapter tensors of `source_state` (PEFT state-dict names) into `reference`."""
    from peft import set_peft_model_state_dict

    adapter_state = {k: v for k, v in source_state.items() if "lora_" in k or "vera_" in k}
    result = set_peft_model_state_dict(reference, adapter_state)
    missing = [key for key in result.missing_keys if ("lora_" in key or "vera_lambda" in key)]
    assert not missing and not result.unexpected_keys, (missing[:3], result.unexpected_keys[:3])


def reference_optimizer(model: torch.nn.Module, adapter: dict[str, Any], optim: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer PEFT (or the paper) prescribes for the method, with the run's lr, betas and weight decay."""
    from peft.optimizers import create_loraplus_optimizer

    lr, betas, decay = optim.get("lr", 2e-4), tuple(optim.get("betas", (0.9, 0.999))), optim.get("weight_decay", 0.0)
    if optim.get("lora_plus_ratio"):
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=optim["lora_plus_ratio"],
                                         loraplus_lr_embedding=optim.get("lora_plus_lr_embedding", 1e-6),
                                         loraplus_weight_decay=decay, betas=betas)
    if adapter["method"] == "lora_fa" and adapter.get("project_gradient"):
        project_lora_fa_gradients(model)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, weight_decay=decay)


def project_lora_fa_gradients(model: torch.nn.Module) -> None:
    """LoRA-FA's projected gradient as PEFT's LoraFAOptimizer computes it, g_B ← (1/s²)·g_B·pinv(A·Aᵀ + 1e-8·I),
    applied before an ordinary AdamW. (PEFT's optimizer itself is a HF-style Adam whose eps sits inside the
    bias correction; tests/test_adapters.py compares one of its steps exactly.)"""
    from peft.tuners.lora import LoraLayer

    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        a, scaling = layer.lora_A["default"].weight, layer.scaling["default"]

        def project(grad, a=a, scaling=scaling):
            gram = a.detach() @ a.detach().T + 1e-8 * torch.eye(a.shape[0], dtype=a.dtype)
            return (1 / scaling**2) * (grad @ torch.linalg.pinv(gram))

        layer.lora_B["default"].weight.register_hook(project)


@dataclass
class ExplicitDeltaLora:
    """Delta-LoRA's Algorithm 1 on a PEFT LoRA model: W itself is updated after iterations t > K."""

    model: torch.nn.Module
    start_step: int  # K
    update_ratio: float  # λ

    def __post_init__(self) -> None:
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self._before: list[torch.Tensor] = []

    def _products(self) -> list[torch.Tensor]:
        return [layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
                for layer in self.layers]

    def before_optimizer_step(self) -> None:
        self._before = [p.detach().clone() for p in self._products()]

    def after_optimizer_step(self, t: int) -> None:
        if t <= self.start_step:
            return
        with torch.no_grad():
            for layer, before, after in zip(self.layers, self._before, self._products()):
                layer.base_layer.weight += self.update_ratio * (after - before)


def train_reference(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[list[dict]], grad_clip: float,
                    delta: ExplicitDeltaLora | None = None, rng_streams: list[torch.Tensor] | None = None,
                    schedule=None) -> list[float]:
    """Plain PyTorch: each step averages the loss over its micro-batches (ordered accumulation-major, rank
    minor), clips, steps (and the rate `schedule`, if any); returns the mean loss of every step. `rng_streams`:
    one torch RNG state per rank, so that dropout draws what each worker drew."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    model.train()
    for t, micro_batches in enumerate(batches):
        total = 0.0
        for index, batch in enumerate(micro_batches):
            if rng_streams is not None:
                torch.set_rng_state(rng_streams[index % len(rng_streams)])
            loss = model(**batch, use_cache=False).loss  # as the loop: packed rows keep their examples apart
            if rng_streams is not None:
                rng_streams[index % len(rng_streams)] = torch.get_rng_state()
            (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        if delta is not None:
            delta.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
        if delta is not None:
            delta.after_optimizer_step(t)
        losses.append(total)
    return losses
