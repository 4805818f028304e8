"""The memory plan (plan_memory.py): how each part follows the ZeRO stage, the workers, the precision and
gradient checkpointing; the warning above an accelerator's memory; and its activation estimate against the
bytes a real forward and backward keep alive on CPU (every tensor storage tracked from allocation to release)."""

from __future__ import annotations

import functools
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from orchestrator.plan import build_plan, deepspeed_config
from orchestrator.plan_memory import activation_bytes, model_shape
from tests.helpers import MINIMAL_SPEC, make_spec

GB = 1e9


def _llama_7b():
    """Llama-2-7B's widths with 4 of its 32 layers: the arithmetic is the same, and PEFT attaches faster."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


@functools.cache
def _plan(stage: int, workers: int = 8, precision: str = "bf16", **train):
    spec = make_spec(base=MINIMAL_SPEC, adapter={"r": 16, "target_modules": "all-linear", "dropout": 0.0},
                     data={"max_length": 2048}, train={"batch_size": 1, "precision": precision, **train},
                     deepspeed={"zero_stage": stage}, scaling={"num_workers": workers, "use_gpu": True, "accelerator_type": "A100-80G"})
    return build_plan(spec, _llama_7b())


def test_base_weights_follow_precision_and_zero3_partitioning():
    z2, z3, fp32 = _plan(2), _plan(3), _plan(2, precision="fp32")
    assert z2.memory.base_weights == z2.base_parameters * 2  # bf16, whole on every GPU
    assert fp32.memory.base_weights == z2.base_parameters * 4
    assert z3.memory.base_weights == z2.base_parameters * 2 // 8
    assert z3.memory.gathered > 0 and z2.memory.gathered == 0
    assert z3.memory.total < z2.memory.total
    assert z2.precision == "bf16" and z2.deepspeed["bf16"] == {"enabled": True}
    assert fp32.deepspeed["bf16"] == {"enabled": False}


def test_adapter_state_is_partitioned_from_zero_1():
    trainable = _plan(0).trainable_parameters
    # bf16 weights + bf16 gradients + fp32 master, m and v
    assert _plan(0).memory.adapter == trainable * (2 + 2 + 12)
    assert _plan(2).memory.adapter == trainable * 2 + trainable * 2 // 8 + trainable * 12 // 8


def test_gradient_checkpointing_keeps_a_fraction_of_the_activations():
    full, checkpointed = _plan(2).memory.activations, _plan(2, gradient_checkpointing=True).memory.activations
    assert checkpointed < full / 3  # 4 layers here; the fraction shrinks with depth


def test_plan_warns_when_the_estimate_exceeds_the_accelerator():
    z2, z3 = _plan(2, batch_size=32), _plan(3, batch_size=1, gradient_checkpointing=True)
    assert z2.memory.limit == 80 * GB and not z2.memory.fits
    assert z2.warnings == [z2.memory.warning()] and "exceeds its 80.0 GB; try deepspeed.zero_stage: 3" in z2.warnings[0]
    assert "warning:" in z2.summary() and "GB per GPU of 80.0 GB" in z2.summary()
    assert z3.memory.fits and z3.warnings == []
    assert z2.to_dict()["memory"]["limit_gb"] == 80.0


def test_gpu_memory_gb_overrides_the_accelerator_type_and_needs_gpus():
    from orchestrator.errors import JobSpecError

    spec = make_spec(base=MINIMAL_SPEC, scaling={"use_gpu": True, "accelerator_type": "H100", "gpu_memory_gb": 24})
    assert build_plan(spec, _llama_7b()).memory.limit == 24 * GB
    assert build_plan(make_spec(base=MINIMAL_SPEC), _llama_7b()).memory.limit is None  # CPU: no check
    with pytest.raises(JobSpecError, match="scaling: gpu_memory_gb needs use_gpu: true"):
        make_spec(base=MINIMAL_SPEC, scaling={"gpu_memory_gb": 24})


def test_zero3_config_keeps_one_layer_gathered():
    gpu = make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": 3}, scaling={"use_gpu": True})
    config = deepspeed_config(gpu, _llama_7b())["zero_optimization"]
    layer = 4 * 4096**2 + 3 * 4096 * 11008
    assert config["stage3_max_live_parameters"] == config["stage3_max_reuse_distance"] == layer
    assert config["stage3_prefetch_bucket_size"] == layer // 2
    # On CPU nothing overlaps: nothing is gathered ahead or kept gathered from forward into backward.
    cpu = deepspeed_config(make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": 3}), _llama_7b())["zero_optimization"]
    assert cpu["stage3_max_live_parameters"] == layer
    assert cpu["stage3_prefetch_bucket_size"] == cpu["stage3_max_reuse_distance"] == 0
    assert "stage3_max_live_parameters" not in deepspeed_config(make_spec(base=MINIMAL_SPEC, deepspeed={"zero_stage": 3}))["zero_optimization"]


def test_moe_mlp_width_counts_the_active_experts():
    from transformers import MixtralConfig, Qwen2MoeConfig

    assert model_shape(MixtralConfig(intermediate_size=14336, num_experts_per_tok=2)).mlp_width == 2 * 14336
    qwen = Qwen2MoeConfig(moe_intermediate_size=1408, num_experts_per_tok=4, shared_expert_intermediate_size=5632)
    assert model_shape(qwen).mlp_width == 4 * 1408 + 5632


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive (each counted once, views not at all)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage (a weight's transpose): nothing new.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._alive and key not in inputs:
                    size = storage.nbytes()
                    self._alive[key] = weakref.ref(storage, lambda _, key=key, size=size: self._release(key, size))
                    self.live += size
                    self.peak = max(self.peak, self.live)
        return out

    def _release(self, key: int, size: int) -> None:
        self._alive.pop(key, None)
        self.live -= size


@pytest.mark.parametrize("batch, length, checkpointing, dropout", [(8, 128, False, 0.0), (2, 512, False, 0.05), (8, 256, True, 0.0)])
def test_activation_estimate_within_25_percent_of_a_real_forward_and_backward(tiny_llama_path, batch, length, checkpointing, dropout):
    from transformers import AutoConfig

    from orchestrator.train.model import build_adapted_model

    spec = make_spec(base=MINIMAL_SPEC, adapter={"r": 8, "target_modules": "all-linear", "dropout": dropout},
                     data={"max_length": length}, train={"batch_size": batch, "gradient_checkpointing": checkpointing})
    model, _ = build_adapted_model(spec, tiny_llama_path, torch.float32)
    model.train()
    ids = torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(0))
    with _LiveTensorBytes() as tracked:
        model(input_ids=ids, labels=ids).loss.backward()
    estimate = activation_bytes(spec, model_shape(AutoConfig.from_pretrained(tiny_llama_path)), 4)
    print(f"b{batch} len{length} gc={checkpointing} dropout={dropout}: estimate {estimate / 2**20:.1f} MiB, "
          f"measured {tracked.peak / 2**20:.1f} MiB")
    assert 0.75 <= estimate / tracked.peak <= 1.25
