"""A plain-PyTorch replay of a 2-worker run with the independent references of tests/references.py: the
same batches each rank saw (the project's data pipeline and sample schedule, which are not adapter math),
each rank's RNG stream, gradients averaged over ranks and accumulation, clipping, the rate schedule
(transformers' `get_scheduler`, as the spec names it).

Only the initial adapter values and the RNG position come from building the project's model once with the
run's seed (as a worker does): the method's forward, optimizer groups, projection and W update are PEFT's
or the paper's. Comparing a run with it checks that the method survived DeepSpeed, two ranks and resume.
"""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict

from orchestrator.builtin.datasets import resolve_data_path
from orchestrator.spec import JobSpec
from orchestrator.train import data as data_lib
from orchestrator.train.data import prepare_data
from orchestrator.train.model import build_adapted_model, load_tokenizer
from tests.references import ExplicitDeltaLora, copy_initial_adapter, reference_model, reference_optimizer, train_reference


def replay(spec: JobSpec, model_path: str, data_path: str) -> torch.nn.Module:
    """The reference model after `spec.train.max_steps` steps."""
    from transformers import AutoModelForCausalLM, get_scheduler

    train, optim = spec.train, spec.optim.model_dump()
    world = spec.scaling.num_workers
    torch.manual_seed(train.seed)
    tokenizer = load_tokenizer(model_path, spec.model.trust_remote_code)
    initial = get_peft_model_state_dict(build_adapted_model(spec, model_path, torch.float32)[0])
    eval_path = resolve_data_path(spec.data.eval_path) if spec.data.eval_path else None  # else eval is split off
    train_set = prepare_data(spec, data_path, eval_path, tokenizer).train
    worker_rng = torch.get_rng_state()  # where every worker's stream stands at its first step

    adapter = spec.adapter.model_dump()
    model = reference_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), adapter)
    copy_initial_adapter(initial, model)
    delta = ExplicitDeltaLora(model, adapter["start_step"], adapter["update_ratio"]) if adapter["method"] == "delta_lora" else None
    schedules = [data_lib.BatchSchedule(len(train_set), train.batch_size, train.grad_accum, world, r, train.seed) for r in range(world)]
    batches = [
        [data_lib.collate([train_set[i] for i in schedules[rank].indices(step, micro)], tokenizer.pad_token_id)
         for micro in range(train.grad_accum) for rank in range(world)]
        for step in range(train.max_steps)
    ]
    optimizer = reference_optimizer(model, adapter, optim)
    schedule = get_scheduler(spec.optim.scheduler, optimizer=optimizer, num_warmup_steps=spec.optim.warmup_steps,
                             num_training_steps=train.max_steps)
    train_reference(model, optimizer, batches, spec.optim.grad_clip, delta,
                    rng_streams=[worker_rng.clone() for _ in range(world)], schedule=schedule)
    return model.eval()


def replayed_adapter(spec: JobSpec) -> dict[str, torch.Tensor]:
    """The adapter (PEFT's state dict, as a run stores it) of the replay of `spec` on its own model and data: the
    reference of a run that never stopped, never changed its worker count and never lost a node, computed in this
    process instead of by another run."""
    from orchestrator.builtin.models import resolve_model_path

    model = replay(spec, resolve_model_path(spec.model.path), resolve_data_path(spec.data.path))
    return dict(get_peft_model_state_dict(model))
