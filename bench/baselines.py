"""What the orchestrator is measured against, run as a command of its own so that start-up counts:

    python -m bench.baselines plain SPEC.json       one process: transformers + PEFT + torch AdamW
    python -m bench.baselines deepspeed SPEC.json   N processes (torch.multiprocessing + gloo) + DeepSpeed,
                                                    the project's model, optimizer and DeepSpeed config, no Ray

Both train the spec's batches in the spec's order and print `STEP <n> <seconds since start> <tokens>`
(tokens summed over workers) after every optimizer step, flushed, for bench.measure to time.
"""

from __future__ import annotations

import json
import os
import sys
import time

_STARTED = time.perf_counter()


def _step_line(step: int, tokens: int) -> None:
    print(f"STEP {step} {time.perf_counter() - _STARTED:.4f} {tokens}", flush=True)


def _examples(spec, tokenizer):
    from orchestrator.train import data as data_lib

    return data_lib.prepare_data(spec, spec.data.path, None, tokenizer).train, data_lib


def plain(spec) -> None:
    """The loop a user would write by hand with PEFT: no Ray, no DeepSpeed, one process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from orchestrator.train.model import load_tokenizer

    torch.manual_seed(spec.train.seed)
    device = "cuda" if spec.scaling.use_gpu else "cpu"
    tokenizer = load_tokenizer(spec.model.path)
    dtype = torch.bfloat16 if spec.scaling.use_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=spec.adapter.r, lora_alpha=spec.adapter.alpha, lora_dropout=0.0,
                                             target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.optim.lr, weight_decay=0.0)
    examples, data_lib = _examples(spec, tokenizer)
    schedule = data_lib.BatchSchedule(len(examples), spec.train.batch_size, 1, 1, 0, spec.train.seed)
    model.train()
    for step in range(spec.train.max_steps):
        batch = data_lib.collate([examples[i] for i in schedule.indices(step, 0)], tokenizer.pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        _step_line(step + 1, int(batch["attention_mask"].sum()))


def _deepspeed_worker(rank: int, world: int, port: int, spec_json: str) -> None:
    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # What Ray gives a worker with cpus_per_worker CPUs (it sets OMP_NUM_THREADS the same way).
    torch.set_num_threads(max(1, int(spec_cpus(spec_json))))
    from orchestrator.spec import JobSpec
    from orchestrator.train.engine import build_engine, prepare_deepspeed
    from orchestrator.train.loop import make_scheduler
    from orchestrator.train.model import build_adapted_model, load_tokenizer
    from orchestrator.train.optim import make_optimizer

    spec = JobSpec.model_validate(json.loads(spec_json))
    prepare_deepspeed(spec.scaling.use_gpu)  # before DeepSpeed's import, as in the orchestrator's workers
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(spec.train.seed)
    tokenizer = load_tokenizer(spec.model.path)
    model, _ = build_adapted_model(spec, spec.model.path, torch.float32)
    examples, data_lib = _examples(spec, tokenizer)
    optimizer = make_optimizer(model, spec)
    engine = build_engine(model, optimizer, spec, lr_scheduler=make_scheduler(optimizer, spec))
    schedules = [data_lib.BatchSchedule(len(examples), spec.train.batch_size, 1, world, r, spec.train.seed)
                 for r in range(world)]
    engine.train()
    for step in range(spec.train.max_steps):
        batch = data_lib.collate([examples[i] for i in schedules[rank].indices(step, 0)], tokenizer.pad_token_id)
        engine.backward(engine(**batch).loss)
        engine.step()
        if rank == 0:  # every rank's batch is known from the schedule: no extra collective on the hot path
            _step_line(step + 1, sum(len(examples[i]["input_ids"]) for s in schedules for i in s.indices(step, 0)))
    torch.distributed.destroy_process_group()


def spec_cpus(spec_json: str) -> float:
    return json.loads(spec_json).get("scaling", {}).get("cpus_per_worker", 1.0)


def deepspeed_bare(spec, spec_json: str) -> None:
    import torch.multiprocessing as mp

    from orchestrator.storage.objectstore import free_ports

    world = spec.scaling.num_workers
    mp.spawn(_deepspeed_worker, args=(world, free_ports(1)[0], spec_json), nprocs=world, join=True)


def main(argv: list[str]) -> None:
    from orchestrator.spec import JobSpec

    kind, path = argv
    spec_json = open(path).read()
    spec = JobSpec.model_validate(json.loads(spec_json))
    plain(spec) if kind == "plain" else deepspeed_bare(spec, spec_json)


if __name__ == "__main__":
    main(sys.argv[1:])
