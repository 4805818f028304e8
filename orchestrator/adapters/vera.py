"""VeRA (Kopiczko et al. 2024): h = W0·x + Λ_b·B·Λ_d·A·x.

A and B are random, frozen and shared by every adapted layer (one storage each, sized to the largest
layer and sliced); each layer trains only two vectors, b (d_out, init 0) and d (r, init d_initial).
PEFT's VeRA is used as is: its shared projections are buffers, which DeepSpeed never partitions.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.adapters.registry import AdapterMethod, register


class VeraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="Rank of the shared random projections (VeRA uses 256–1024).")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Names (suffixes) of the linear layers to adapt, or 'all-linear'.",
    )
    d_initial: float = Field(0.1, gt=0, description="Initial value of every d vector (b starts at 0).")
    projection_prng_key: int = Field(0, ge=0, description="Seed of the shared random A and B.")
    save_projection: bool = Field(
        True, description="Store A and B with the adapter (bigger, but independent of the RNG implementation)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")


def attach_vera(model, spec: VeraSpec):
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(
        r=spec.r,
        target_modules=spec.target_modules,
        projection_prng_key=spec.projection_prng_key,
        save_projection=spec.save_projection,
        vera_dropout=spec.dropout,
        d_initial=spec.d_initial,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for layer in vera_layers(model):
        layer.register_forward_pre_hook(_projections_follow_vectors)
    return model


def vera_layers(model):
    from peft.tuners.vera import VeraLayer

    return [module for module in model.modules() if isinstance(module, VeraLayer)]


def _projections_follow_vectors(layer, inputs) -> None:
    """Cast the shared A and B to the dtype of the layer's trained vectors, once, in place.

    DeepSpeed's bf16 mode converts parameters, not buffers: PEFT's shared projections would stay fp32
    and the next matmul would fail on mixed dtypes. Every layer holds the same BufferDict, so the first
    layer's cast serves all of them and A and B keep one storage each.
    """
    dtype = next(iter(layer.vera_lambda_d.values())).dtype
    for projections in (layer.vera_A, layer.vera_B):
        for name, tensor in list(projections.items()):
            if tensor.dtype != dtype:
                projections[name] = tensor.to(dtype)


def count_vera_trainable(spec: VeraSpec, linear_shapes: list[tuple[int, int]]) -> int:
    return sum(d_out + spec.r for _, d_out in linear_shapes)


register(
    AdapterMethod(
        name="vera", spec=VeraSpec, attach=attach_vera, count_trainable=count_vera_trainable, trains_a_and_b=False
    )
)
