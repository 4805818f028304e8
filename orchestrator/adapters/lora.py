"""LoRA (Hu et al. 2021): h = W0·x + s·B·A·dropout(x), s = alpha/r (or alpha/sqrt(r) with rsLoRA)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.adapters.registry import AdapterMethod, register


class LowRankSpec(BaseModel):
    """Options shared by the methods that train (or freeze) a rank-r pair B·A per layer."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: s = alpha/r (alpha/sqrt(r) with rslora).")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Names (suffixes) of the linear layers to adapt, or 'all-linear'.",
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023).")


class LoraSpec(LowRankSpec):
    method: Literal["lora"] = "lora"
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")


def lora_config(spec: LowRankSpec, dropout: float):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=dropout,
        target_modules=spec.target_modules,
        use_rslora=spec.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_layers(model):
    """(name, layer) for every PEFT LoRA linear layer in `model`."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def require_linear_layers(model, method: str) -> None:
    """Refuse an adapted embedding (PEFT's lora_embedding_A/B), for methods defined on linear layers only.
    ValueError is how PEFT refuses a layer, so `plan` reports it in one line."""
    for name, layer in lora_layers(model):
        if not layer.lora_A:
            raise ValueError(f"{method} adapts linear layers only, and {name.removeprefix('base_model.model.')} is not one")


def attach_lora(model, spec: LoraSpec):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec, spec.dropout))


def count_low_rank_trainable(spec: LowRankSpec, linear_shapes: list[tuple[int, int]]) -> int:
    return sum(spec.r * (d_in + d_out) for d_in, d_out in linear_shapes)


def check_low_rank_layers(spec: LowRankSpec, adapted_layers: dict[str, tuple[int, int]]) -> list[str]:
    """A per-layer pair B·A of rank above a layer's dimension wastes parameters and memory. (VeRA's
    shared random projections are another matter: their rank commonly exceeds the hidden size.)"""
    smallest = min((min(shape) for shape in adapted_layers.values()), default=None)
    if smallest is not None and spec.r > smallest:
        return [f"adapter.r: {spec.r} is larger than the smallest adapted layer dimension ({smallest})"]
    return []


register(AdapterMethod(name="lora", spec=LoraSpec, attach=attach_lora, count_trainable=count_low_rank_trainable,
                       check_layers=check_low_rank_layers))
