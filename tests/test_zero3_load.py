"""ZeRO-3 loading reads each rank's own partition of every tensor straight from the safetensors file: the byte
ranges, DeepSpeed's padding of the last partition, and the fallback when the checkpoint is not the model's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from orchestrator.train.zero3_load import checkpoint_index, read_own_partitions


@pytest.fixture(autouse=True)
def _deepspeed_on_cpu():
    from orchestrator.train.engine import prepare_deepspeed

    prepare_deepspeed(use_gpu=False)  # before DeepSpeed's import: it picks its accelerator then


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(0))
        self.bias = torch.nn.Parameter(torch.empty(0))


def _partitioned_like_deepspeed(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]], world: int) -> None:
    """What zero.Init leaves on a parameter: its full size, and a flat local partition of ceil(numel / world)."""
    for name, parameter in module.named_parameters():
        numel = int(torch.tensor(shapes[name]).prod())
        parameter.ds_numel, parameter.ds_process_group = numel, None
        parameter.ds_tensor = torch.full((-(-numel // world),), -1.0, dtype=torch.bfloat16)
        parameter.ds_tensor.ds_numel = parameter.ds_tensor.numel()


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_each_rank_reads_its_own_slice_and_the_last_keeps_its_padding(tmp_path, monkeypatch, rank):
    import deepspeed.comm

    weight, bias = torch.arange(10, dtype=torch.float32).reshape(2, 5), torch.tensor([7.0, 8.0])
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "model.safetensors"))
    module = _Tiny()
    _partitioned_like_deepspeed(module, {"weight": (2, 5), "bias": (2,)}, world=3)
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: rank)

    assert read_own_partitions(module, checkpoint_index(str(tmp_path)))
    expected = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, -1, -1]}[rank]  # 10 values in partitions of 4
    assert module.weight.ds_tensor.tolist() == expected and module.weight.ds_tensor.dtype == torch.bfloat16
    assert module.bias.ds_tensor.tolist() == {0: [7.0], 1: [8.0], 2: [-1.0]}[rank]


def test_a_checkpoint_that_is_not_the_models_parameters_is_left_to_transformers(tmp_path, monkeypatch):
    import deepspeed.comm

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    module = _Tiny()
    _partitioned_like_deepspeed(module, {"weight": (2, 5), "bias": (2,)}, world=2)
    save_file({"weight": torch.zeros(2, 5), "bias": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    assert not read_own_partitions(module, checkpoint_index(str(tmp_path)))  # a size differs
    save_file({"weight": torch.zeros(2, 5), "bias": torch.zeros(2), "experts.0.w1": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    assert not read_own_partitions(module, checkpoint_index(str(tmp_path)))  # a tensor the model has no place for
    assert module.weight.ds_tensor.tolist() == [-1.0] * 5, "nothing is read unless everything matches"
    assert checkpoint_index(str(tmp_path / "elsewhere")) is None
