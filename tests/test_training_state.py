"""The adapter's training state (train/optim_state.py) round-trips exactly through a fresh engine under every ZeRO
stage and precision, in-process (one rank): a run resumed from it takes the same steps as one that never stopped.
Another worker count is the Ray run's part (tests/test_resume_elastic.py)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.adapters import get_method
from orchestrator.plan import deepspeed_config
from orchestrator.train.engine import build_engine
from orchestrator.train.loop import make_scheduler
from orchestrator.train.model import build_adapted_model
from orchestrator.train.optim import make_optimizer
from orchestrator.train.optim_state import gather_training_state, load_training_state, save_training_state
from tests.test_deepspeed_inprocess import STAGES, _batches, job_spec

ADAPTERS = {
    "lora+": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {"lora_plus_ratio": 4}),
    "delta_lora": ({"method": "delta_lora", "r": 4, "alpha": 8, "start_step": 0, "update_ratio": 2.0}, {}),
    "vera": ({"method": "vera", "r": 16, "d_initial": 0.1}, {}),
}


def _engine(spec, path: str, seed: int):
    torch.manual_seed(seed)  # another seed: the restore, not the initialisation, must make the runs equal
    model, _ = build_adapted_model(spec, path, ds_config=deepspeed_config(spec))
    optimizer = make_optimizer(model, spec)
    return build_engine(model, optimizer, spec, lr_scheduler=make_scheduler(optimizer, spec))


def _steps(engine, spec, batches, first_step: int) -> list[float]:
    method, losses = get_method(spec.adapter.method), []
    for offset, batch in enumerate(batches):
        if method.before_step is not None:
            method.before_step(engine.module, spec.adapter, first_step + offset, spec.deepspeed.zero_stage == 3)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", STAGES, ids=[f"z{stage}-{precision}" for stage, precision in STAGES])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_a_restored_engine_takes_the_same_steps(single_rank_group, tiny_llama_path, tmp_path, adapter, stage, precision):
    settings, optim = ADAPTERS[adapter]
    # warm-up and decay: the LR schedule's position is part of the state
    optim = {"lr": 1e-2 if precision == "fp32" else 2e-3, "scheduler": "linear", "warmup_steps": 2, **optim}
    config = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
    spec = job_spec(stage, settings, optim, config, precision=precision).model_copy(deep=True)
    spec.train.max_steps = 8
    batches = _batches(256, 6)

    engine = _engine(spec, tiny_llama_path, seed=0)
    _steps(engine, spec, batches[:3], 0)
    save_training_state(engine, tmp_path / "state", is_writer=True)
    saved, _ = gather_training_state(engine)
    rates_at_save = engine.lr_scheduler.get_last_lr()
    expected = _steps(engine, spec, batches[3:6], 3)
    expected_after, _ = gather_training_state(engine)

    restored = _engine(spec, tiny_llama_path, seed=1)
    load_training_state(restored, tmp_path / "state")
    again, _ = gather_training_state(restored)
    assert again.keys() == saved.keys()
    for name in saved:
        assert torch.equal(again[name], saved[name]), f"{name} differs after the restore"
    assert restored.lr_scheduler.get_last_lr() == rates_at_save
    resumed = _steps(restored, spec, batches[3:6], 3)
    assert resumed == expected, "the resumed steps' losses differ from the uninterrupted run's"
    after, meta = gather_training_state(restored)
    assert meta["optimizer_step"] == 6
    for name in expected_after:
        assert torch.equal(after[name], expected_after[name]), f"{name} differs after the resumed steps"
