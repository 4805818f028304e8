"""The one training loop, run by every Ray Train worker: build → resume → train → checkpoint → finish."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.adapters import get_method
from orchestrator.adapters.registry import peft_export
from orchestrator.spec import JobSpec
from orchestrator.train import data as data_lib
from orchestrator.train import faults, storage_io
from orchestrator.train.checkpoint import save_adapter, save_training_state
from orchestrator.train.engine import build_engine, prepare_deepspeed
from orchestrator.train.optim import check_rates, expected_rates, make_optimizer
from orchestrator.train.model import build_adapted_model, frozen_weights_checksum, load_tokenizer


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config` holds the validated spec, resolved paths and run identity."""
    worker_started = time.perf_counter()
    # Progress reaches the console through the driver; per-report INFO lines would drown it.
    for noisy in ("botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_ray_report_log()
    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = JobSpec.model_validate(config["spec"])
    prepare_deepspeed(spec.scaling.use_gpu)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    run = storage_io.RunStorage.open(config)
    progress = config.get("progress")

    torch.manual_seed(spec.train.seed)
    tokenizer = load_tokenizer(config["model_path"], spec.model.trust_remote_code)
    model, counts = build_adapted_model(spec, config["model_path"], torch.bfloat16 if spec.scaling.use_gpu else torch.float32)
    # Before DeepSpeed partitions anything, so this is local: only rank 0 records it.
    base_checksum = frozen_weights_checksum(model) if rank == 0 else None
    with _node_leader_first(context.get_local_rank()):
        train_set, eval_set = prepare_data(spec, config["data_path"], config.get("eval_data_path"), tokenizer)

    optimizer = make_optimizer(model, spec)
    scheduler = make_scheduler(optimizer, spec)
    built_rates = expected_rates(optimizer)
    engine = build_engine(model, optimizer, spec, lr_scheduler=scheduler)
    check_rates(engine.optimizer, built_rates)
    zero3 = spec.deepspeed.zero_stage == 3
    method = get_method(spec.adapter.method)
    export = functools.partial(method.export or peft_export, spec=spec.adapter)
    if rank == 0:
        _emit(progress, event="start", counts=str(counts), trainable=counts.trainable, total=counts.total,
              train_examples=len(train_set), eval_examples=len(eval_set))

    start_step, history = run.resume(engine, rank, world)
    trainer_state = {"step": start_step, "tokens": history[-1]["tokens"] if history else 0}
    schedule = data_lib.BatchSchedule(len(train_set), spec.train.batch_size, spec.train.grad_accum, world, rank, spec.train.seed)
    evaluation = data_lib.eval_batches(eval_set, spec.train.batch_size, spec.train.eval_batches, world, rank)
    pad_id = tokenizer.pad_token_id
    window = {"loss_sum": 0.0, "micro_steps": 0, "tokens": 0, "started": time.perf_counter()}
    run_started = time.perf_counter()
    last_checkpoint_dir = None

    engine.train()
    for step in range(start_step, spec.train.max_steps):
        if method.before_step is not None:
            method.before_step(engine.module, spec.adapter, step, zero3)
        for micro_step in range(spec.train.grad_accum):
            batch = data_lib.collate([train_set[i] for i in schedule.indices(step, micro_step)], pad_id)
            window["tokens"] += int(batch["attention_mask"].sum())  # counted on the host copy: no device sync
            batch = {key: value.to(engine.device, non_blocking=True) for key, value in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            # Kept on the device until the next log: `.item()` here would wait for the GPU every step.
            window["loss_sum"] += loss.detach().double()
            window["micro_steps"] += 1
        if step == start_step:  # and once more after a real step: the scheduler has run by now
            check_rates(engine.optimizer, built_rates)
            if rank == 0:  # tells the user (and bench/) that start-up is over, without a collective
                _emit(progress, event="first_step", step=step + 1, worker_s=time.perf_counter() - worker_started)
        done = step + 1
        is_last = done == spec.train.max_steps
        eval_due = is_last or (spec.train.eval_every and done % spec.train.eval_every == 0)
        checkpoint_due = is_last or (spec.train.checkpoint_every and done % spec.train.checkpoint_every == 0)
        log_due = eval_due or checkpoint_due or done % spec.train.log_every == 0
        # ray.train.report synchronises with the controller (about 1 s each on 2 cores): report to Ray
        # (and Tune's schedulers) only at evaluations and checkpoints; the console gets every log.
        if not log_due:
            continue
        metrics = _window_metrics(window, engine.device)
        trainer_state["step"], trainer_state["tokens"] = done, trainer_state["tokens"] + metrics.pop("tokens")
        rates = dict(zip((name for name, _ in built_rates), engine.get_lr()))
        metrics.update(step=done, tokens=trainer_state["tokens"], epoch=schedule.epoch(done), lr=engine.get_lr()[0])
        if "B" in rates:  # LoRA+
            metrics["lr_B"] = rates["B"]
        if eval_due:
            metrics["eval_loss"] = evaluate(engine, evaluation, pad_id)
        history.append(metrics)
        if rank == 0:
            _emit(progress, event="step", max_steps=spec.train.max_steps, elapsed=time.perf_counter() - run_started,
                  start_step=start_step, **metrics)
        if checkpoint_due:
            if last_checkpoint_dir is not None:
                shutil.rmtree(last_checkpoint_dir, ignore_errors=True)
            blocking_started = time.perf_counter()
            last_checkpoint_dir = checkpoint(engine, run, done, metrics, trainer_state, history, rank, zero3, export)
            if rank == 0:
                _emit(progress, event="checkpoint", step=done, uri=run.layout.uri + f"/checkpoints/step-{done:08d}",
                      blocked_s=time.perf_counter() - blocking_started)
        elif eval_due:
            ray.train.report(metrics)
        faults.maybe_fail(config["run_id"], done, rank)

    base_checksum_after = frozen_weights_checksum(engine.module, zero3=zero3)
    probe = probe_logits(engine, (eval_set or train_set)[0], pad_id)
    if rank == 0:
        summary = {
            "status": "complete", "steps": spec.train.max_steps, "resumed_from_step": start_step,
            "trainable_parameters": counts.trainable, "total_parameters": counts.total,
            "trainable_percent": counts.percent, "base_checksum_before": base_checksum,
            "base_checksum_after": base_checksum_after, "base_unchanged": base_checksum == base_checksum_after,
            "final": history[-1] if history else {}, "wall_seconds": time.perf_counter() - run_started,
        }
        run.finish(last_checkpoint_dir, max(start_step, spec.train.max_steps), summary, probe)
        _emit(progress, event="done", adapter_uri=run.layout.uri + "/adapter", summary=summary)
    if last_checkpoint_dir is not None:
        shutil.rmtree(last_checkpoint_dir, ignore_errors=True)


def prepare_data(spec: JobSpec, data_path: str, eval_data_path: str | None, tokenizer):
    records = data_lib.load_records(data_path)
    data_lib.check_fields(records, spec.data, data_path)
    examples = data_lib.tokenize_records(records, tokenizer, spec.data)
    if eval_data_path:
        eval_records = data_lib.load_records(eval_data_path)
        data_lib.check_fields(eval_records, spec.data, eval_data_path)
        return examples, data_lib.tokenize_records(eval_records, tokenizer, spec.data)
    return data_lib.split_train_eval(examples, spec.data.eval_fraction, spec.train.seed)


def make_scheduler(optimizer, spec: JobSpec):
    from transformers import get_scheduler

    return get_scheduler(
        spec.optim.scheduler, optimizer=optimizer,
        num_warmup_steps=spec.optim.warmup_steps, num_training_steps=spec.train.max_steps,
    )


def evaluate(engine, batches, pad_id: int) -> float:
    """Token-weighted mean loss over every rank's evaluation batches."""
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    engine.eval()
    with torch.no_grad():
        for examples in batches:
            batch = {k: v.to(engine.device) for k, v in data_lib.collate(examples, pad_id).items()}
            label_tokens = int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())
            loss = engine(**batch).loss  # every rank runs every forward: a collective under ZeRO-3
            if label_tokens:  # a padding batch (see eval_batches) counts nothing
                totals[0] += loss.double() * label_tokens
                totals[1] += label_tokens
    engine.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def checkpoint(engine, run, step: int, metrics: dict, trainer_state: dict, history: list, rank: int, zero3: bool,
               export) -> Path:
    """Save adapter + engine state locally, upload through Ray, then write the manifest. Collective.
    Synchronous on purpose: "checkpoint saved" means the checkpoint is complete in storage, so a
    failure right after it resumes from it (a background upload lost it in CI; see docs/benchmarks.md)."""
    local = Path(tempfile.mkdtemp(prefix=f"orchestrator-step{step}-rank{rank}-"))
    save_adapter(engine.module, local / "adapter", zero3=zero3, is_writer=rank == 0, export=export)
    save_training_state(engine, local, rank, dict(trainer_state))
    run.report_checkpoint(local, step, metrics, history, rank)
    return local


def probe_logits(engine, example, pad_id: int) -> dict[str, torch.Tensor]:
    """The trained model's logits at the last positions of one example, so anyone can check that the
    exported adapter reproduces the trained model. Collective under ZeRO-3 (every rank runs it)."""
    batch = {k: v.to(engine.device) for k, v in data_lib.collate([example], pad_id).items()}
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return {"input_ids": batch["input_ids"][0].cpu(), "logits": logits[0, -4:].float().cpu()}


def _window_metrics(window: dict, device) -> dict:
    """Mean train loss and tokens/s since the last log, summed over all workers."""
    totals = torch.tensor([0.0, window["micro_steps"], window["tokens"]], dtype=torch.float64, device=device)
    totals[0] += window["loss_sum"]  # a device tensor (or 0.0 for an empty window)
    dist.all_reduce(totals)
    elapsed = max(time.perf_counter() - window["started"], 1e-9)
    metrics = {"loss": float(totals[0] / totals[1]), "tokens_per_s": float(totals[2] / elapsed), "tokens": int(totals[2])}
    window.update(loss_sum=0.0, micro_steps=0, tokens=0, started=time.perf_counter())
    return metrics


@contextlib.contextmanager
def _node_leader_first(local_rank: int):
    """Local rank 0 tokenizes (and fills the node's dataset cache) before the node's other workers read it:
    one tokenization per node instead of one per worker, as `TrainingArguments.main_process_first` does."""
    if local_rank != 0:
        dist.barrier()
    yield
    if local_rank == 0:
        dist.barrier()


def _quiet_ray_report_log() -> None:
    """Ray Train logs every report at INFO (from a logger named by file path); the console already
    shows our progress line for it. Internal to Ray, so absent modules are fine."""
    try:
        from ray.train.v2._internal.execution import context as ray_train_context

        ray_train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def _emit(progress, **event) -> None:
    if progress is not None:
        progress.put_nowait(event)
