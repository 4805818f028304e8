"""A plain-PyTorch replay of what the DeepSpeed workers compute: same init, same per-rank batches and
RNG streams, gradients averaged over ranks, the same clipping, optimizer groups and scheduler.

Comparing a run's adapter with this replay checks that DeepSpeed (any ZeRO stage) applied the update
each method intends: LoRA+'s per-group rates, LoRA-FA's projection, Delta-LoRA's snapshot, VeRA's
shared projections — and, across an injected failure, that resume was exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator.adapters import get_method
from orchestrator.adapters.registry import peft_export
from orchestrator.spec import JobSpec
from orchestrator.train import data as data_lib
from orchestrator.train.loop import make_scheduler, prepare_data
from orchestrator.train.model import build_adapted_model, load_tokenizer
from orchestrator.train.optim import make_optimizer


@dataclass
class Replay:
    model: torch.nn.Module
    initial_state: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float

    def export(self, spec: JobSpec) -> dict[str, torch.Tensor]:
        method = get_method(spec.adapter.method)
        return (method.export or peft_export)(self.model, spec.adapter)[0]


def replay(spec: JobSpec, model_path: str, data_path: str) -> Replay:
    train = spec.train
    world = spec.scaling.num_workers
    torch.manual_seed(train.seed)
    tokenizer = load_tokenizer(model_path, spec.model.trust_remote_code)
    model, _ = build_adapted_model(spec, model_path, torch.float32)
    method = get_method(spec.adapter.method)
    initial_state = {k: v.clone() for k, v in (method.export or peft_export)(model, spec.adapter)[0].items()}
    train_set, _ = prepare_data(spec, data_path, None, tokenizer)
    optimizer = make_optimizer(model, spec)
    scheduler = make_scheduler(optimizer, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedules = [data_lib.BatchSchedule(len(train_set), train.batch_size, train.grad_accum, world, r, train.seed) for r in range(world)]
    pad = tokenizer.pad_token_id
    first_batch = data_lib.collate([train_set[i] for s in schedules for i in s.indices(0, 0)], pad)
    loss_before = _eval_loss(model, first_batch)
    rng = [torch.get_rng_state() for _ in range(world)]  # every worker seeds identically
    model.train()
    for step in range(train.max_steps):
        if method.before_step is not None:
            method.before_step(model, spec.adapter, step, False)
        for micro_step in range(train.grad_accum):
            for rank in range(world):
                torch.set_rng_state(rng[rank])
                batch = data_lib.collate([train_set[i] for i in schedules[rank].indices(step, micro_step)], pad)
                loss = model(**batch).loss
                rng[rank] = torch.get_rng_state()
                (loss / (world * train.grad_accum)).backward()
        if spec.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, spec.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return Replay(model, initial_state, loss_before, _eval_loss(model, first_batch))


def _eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss
