"""Real DeepSpeed in the test process (one rank, gloo): what `deepspeed.initialize` does to each method's
structure, checked directly rather than through a run."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from orchestrator.spec import validate_spec
from orchestrator.train.engine import build_engine
from orchestrator.train.model import build_adapted_model
from orchestrator.train.optim import check_rates, expected_rates, make_optimizer


@pytest.fixture(scope="module")
def single_rank_group():
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    variables = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()
    # Ray workers started later in this session inherit the environment: leave no rank variables behind.
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def initialized(tiny_llama_path, stage: int, adapter: dict, optim: dict | None = None):
    spec = validate_spec({"name": "t", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"},
                          "adapter": {**adapter, "target_modules": "all-linear"}, "optim": optim or {},
                          "deepspeed": {"zero_stage": stage}, "scaling": {"num_workers": 1}})
    model, _ = build_adapted_model(spec, tiny_llama_path, torch.float32)
    optimizer = make_optimizer(model, spec)
    built = expected_rates(optimizer)
    engine = build_engine(model, optimizer, spec)
    return engine, built


@pytest.mark.parametrize("stage", [2, 3])
def test_vera_projections_stay_one_storage_after_initialize(single_rank_group, tiny_llama_path, stage):
    engine, _ = initialized(tiny_llama_path, stage, {"method": "vera", "r": 64})
    layers = [m for _, m in engine.module.named_modules() if hasattr(m, "vera_lambda_b")]
    assert len(layers) == 14
    assert len({m.vera_A["default"].data_ptr() for m in layers}) == 1
    assert len({m.vera_B["default"].data_ptr() for m in layers}) == 1


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_plus_rates_survive_initialize(single_rank_group, tiny_llama_path, stage):
    engine, built = initialized(tiny_llama_path, stage, {"method": "lora", "r": 4}, {"lr": 1e-4, "lora_plus_ratio": 16})
    assert [name for name, _ in built] == ["A", "B"]
    check_rates(engine.optimizer, built)
    assert engine.optimizer.param_groups[1]["lr"] == pytest.approx(16 * engine.optimizer.param_groups[0]["lr"])
