"""The one training loop, run by every Ray Train worker: build → resume → train → checkpoint → finish."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from orchestrator.adapters import get_method
from orchestrator.batching import global_batch, split_global_batch
from orchestrator.errors import first_line
from orchestrator.adapters.registry import peft_export
from orchestrator.spec import JobSpec
from orchestrator.train import data as data_lib
from orchestrator.train import faults, scratch, storage_io
from orchestrator.train.checkpoint import Checkpointer, TrainerState
from orchestrator.train.control import SchedulerGate, StepBoundary
from orchestrator.train.engine import build_engine, prepare_deepspeed, trim_freed_heap
from orchestrator.train.measure import LossWindow, evaluate, probe_logits
from orchestrator.train.model import ParameterCounts, build_adapted_model, frozen_weights_checksum, load_tokenizer
from orchestrator.train.optim import check_rates, expected_rates, make_optimizer, rate_metrics


@dataclass
class Worker:
    """One worker, set up: what the loop reads at every step, built once."""

    spec: JobSpec
    rank: int
    world: int
    batch_size: int  # per worker and micro-step: the run's global batch split over this worker count
    grad_accum: int
    run: storage_io.RunStorage
    emit: Callable[..., None]  # a progress event for the driver's console (rank 0's; a no-op elsewhere)
    pad_id: int
    train_set: list
    data_report: data_lib.DataReport
    evaluation: list  # this worker's evaluation batches
    probe_example: Any  # the example whose final logits the run publishes
    counts: ParameterCounts
    base_checksum: Optional[str]  # of the frozen base before training (rank 0's)
    engine: Any
    built_rates: list[tuple[str, float]]  # (optimizer group, base learning rate) as built
    checkpoints: Checkpointer
    boundary: StepBoundary  # the group's agreement to stop, or to checkpoint before a node goes
    gate: SchedulerGate  # a search trial's wait, at each checkpoint, for its scheduler's verdict
    # The adapter method's per-step work (Delta-LoRA's snapshot), and a test's fault injection: None
    # when there is none, so production pays one `if` per step for each.
    before_step: Optional[Callable[[int], None]]
    after_step: Optional[Callable[[int], None]]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config` holds the validated spec, the plan's DeepSpeed config, resolved
    paths and the run's identity (launch/run.py's worker_config)."""
    worker_started = time.perf_counter()
    worker = set_up(config)
    spec, engine = worker.spec, worker.engine
    start_step, history = worker.run.resume(engine, worker.rank, worker.world)
    state = TrainerState(step=start_step, tokens=history[-1]["tokens"] if history else 0)
    schedule = data_lib.BatchSchedule(len(worker.train_set), worker.batch_size, worker.grad_accum,
                                      worker.world, worker.rank, spec.train.seed)
    window = LossWindow()
    run_started = time.perf_counter()

    engine.train()
    for step in range(start_step, spec.train.max_steps):
        if worker.before_step:
            worker.before_step(step)
        for micro_step in range(worker.grad_accum):
            rows = [worker.train_set[i] for i in schedule.indices(step, micro_step)]
            batch = data_lib.collate(rows, worker.pad_id)
            window.tokens += data_lib.real_tokens(rows)  # counted on the host: no device sync
            # use_cache=False: transformers keeps packed examples apart only without a cache (train/packing.py)
            loss = engine(**{key: value.to(engine.device, non_blocking=True) for key, value in batch.items()},
                          use_cache=False).loss
            engine.backward(loss)
            engine.step()
            window.add(loss)
        if step == start_step:  # and once more after a real step: the scheduler has run by now
            check_rates(engine.optimizer, worker.built_rates)
            # tells the user (and bench/) that start-up is over, without a collective
            worker.emit(event="first_step", step=step + 1, worker_s=time.perf_counter() - worker_started)
        state.step = step + 1
        # Agreed by every rank: the driver asked to stop (Ctrl-C, SIGTERM), or a node is about to be preempted.
        stop, preempted = worker.boundary.agree()
        stop = stop and state.step < spec.train.max_steps
        log_step(worker, state, window, history, schedule.epoch(state.step), start_step, run_started,
                 checkpoint_now=stop or preempted)
        if worker.after_step:
            worker.after_step(state.step)
        if stop:
            worker.emit(event="stopped", step=state.step)
            worker.checkpoints.discard()
            return

    finish(worker, start_step, history, run_started)


def set_up(config: dict[str, Any]) -> Worker:
    """Model + adapter, data, DeepSpeed engine and the per-step hooks of this worker."""
    _quiet_logs()
    spec = JobSpec.model_validate(config["spec"])
    prepare_deepspeed(spec.scaling.use_gpu)  # before anything imports DeepSpeed: it picks its accelerator then
    import ray.train
    import transformers

    transformers.utils.logging.disable_progress_bar()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    batch_size, grad_accum, ds_config = split_for_world(spec, config, world)
    run = storage_io.RunStorage.open(config)
    scratch.remove_orphans()  # the local copies that workers killed on this machine left behind
    progress = config.get("progress") if rank == 0 else None

    model_path, data_path, eval_data_path = node_local_paths(spec, config)
    torch.manual_seed(spec.train.seed)
    tokenizer = load_tokenizer(model_path, spec.model.trust_remote_code)
    model, counts = build_adapted_model(spec, model_path, ds_config=ds_config)  # in train.precision
    # Under ZeRO-3 the base is partitioned while it loads, so its checksum is gathered (collective); else rank 0's copy.
    base_checksum = frozen_weights_checksum(model, zero3=True) if spec.deepspeed.zero_stage == 3 else (
        frozen_weights_checksum(model) if rank == 0 else None)
    with _node_leader_first(context.get_local_rank()):
        data = data_lib.prepare_data(spec, data_path, eval_data_path, tokenizer)
    train_set, eval_set = data.train, data.eval

    optimizer = make_optimizer(model, spec)
    built_rates = expected_rates(optimizer)
    engine = build_engine(model, optimizer, spec, lr_scheduler=make_scheduler(optimizer, spec), ds_config=ds_config)
    check_rates(engine.optimizer, built_rates)
    trim_freed_heap()
    zero3 = spec.deepspeed.zero_stage == 3
    method = get_method(spec.adapter.method)
    export = functools.partial(method.export or peft_export, spec=spec.adapter)
    worker = Worker(
        spec=spec, rank=rank, world=world, batch_size=batch_size, grad_accum=grad_accum, run=run,
        emit=functools.partial(_emit, progress), pad_id=tokenizer.pad_token_id,
        train_set=train_set, data_report=data.report,
        # A packed training row is probed as one sequence (input ids and labels only), as its export check reads it.
        probe_example={key: (eval_set or train_set)[0][key] for key in ("input_ids", "labels")},
        evaluation=data_lib.eval_batches(eval_set, spec.train.batch_size, spec.train.eval_batches, world, rank),
        counts=counts, base_checksum=base_checksum, engine=engine, built_rates=built_rates,
        checkpoints=Checkpointer(engine, run, rank, zero3, export),
        boundary=StepBoundary(config.get("stop_request"), rank, world),
        gate=SchedulerGate(config.get("scheduler_gate"), rank, tuple(config.get("scheduler_rungs", ()))),
        before_step=method.step_hook(engine.module, spec.adapter, zero3),
        after_step=faults.hook_for(config["run_id"], rank),  # None unless a test schedules faults
    )
    worker.emit(event="start", counts=str(counts), trainable=counts.trainable, total=counts.total,
                **dataclasses.asdict(data.report))  # train_examples, eval_examples, packed train_rows, empty rows
    return worker


def node_local_paths(spec: JobSpec, config: dict[str, Any]) -> tuple[str, str, Optional[str]]:
    """(model, data, eval data) paths on this worker's node. The driver resolved them on its own machine: a
    built-in model or dataset is built again here (seeded, so the same on every node; once per node), since a
    worker on another node of a cluster has no copy of the driver's."""
    from orchestrator.builtin.datasets import resolve_data_path
    from orchestrator.builtin.models import resolve_model_path

    def here(field: Optional[str], resolved: Optional[str], resolve: Callable[[str], str]) -> Optional[str]:
        return resolve(field) if field and field.startswith("builtin:") else resolved

    return (here(spec.model.path, config["model_path"], resolve_model_path),
            here(spec.data.path, config["data_path"], resolve_data_path),
            here(spec.data.eval_path, config.get("eval_data_path"), resolve_data_path))


def split_for_world(spec: JobSpec, config: dict[str, Any], world: int) -> tuple[int, int, dict[str, Any]]:
    """(per-worker batch, grad_accum, DeepSpeed config) that keep the run's global batch on `world` workers: an
    elastic run, or a resume on another worker count, trains on what Ray gave it (orchestrator/batching.py)."""
    total = config.get("global_batch") or global_batch(spec.train.batch_size, spec.train.grad_accum, spec.scaling.num_workers)
    split = split_global_batch(total, world, spec.train.batch_size)
    if split is None:  # the spec's check makes this unreachable for counts within scaling.min_workers..num_workers
        raise RuntimeError(f"{world} workers cannot keep the run's global batch {total}")
    batch_size, grad_accum = split
    ds_config = {**config["deepspeed"], "train_micro_batch_size_per_gpu": batch_size,
                 "gradient_accumulation_steps": grad_accum, "train_batch_size": total}
    return batch_size, grad_accum, ds_config


def log_step(worker: Worker, state: TrainerState, window: LossWindow, history: list[dict], epoch: float,
             start_step: int, run_started: float, checkpoint_now: bool = False) -> None:
    """After a step that is due to log, evaluate or checkpoint (or must checkpoint now): its metrics to the
    console, Ray (and Tune's schedulers) and storage. Collective."""
    import ray.train

    train, done, engine = worker.spec.train, state.step, worker.engine
    is_last, at_rung = done == train.max_steps, worker.gate.decides_at(done)
    eval_due = is_last or at_rung or (train.eval_every and done % train.eval_every == 0)
    checkpoint_due = checkpoint_now or is_last or at_rung or (train.checkpoint_every and done % train.checkpoint_every == 0)
    # ray.train.report synchronises with the controller (about 1 s each on 2 cores): report to Ray
    # (and Tune's schedulers) only at evaluations and checkpoints; the console gets every log.
    if not (eval_due or checkpoint_due or done % train.log_every == 0):
        return
    metrics = window.drain(engine.device)
    state.tokens += metrics.pop("tokens")
    metrics.update(step=done, tokens=state.tokens, epoch=epoch, **rate_metrics(worker.built_rates, engine.get_lr()))
    if eval_due:
        metrics["eval_loss"] = evaluate(engine, worker.evaluation, worker.pad_id)
    history.append(metrics)
    worker.emit(event="step", max_steps=train.max_steps, elapsed=time.perf_counter() - run_started,
                start_step=start_step, **metrics)
    # Where this start of the run began: a search counts the steps its trials trained, restarts included.
    reported = {**metrics, "resumed_from_step": start_step}
    if checkpoint_due:
        blocking_started = time.perf_counter()
        worker.checkpoints.save(state, reported, history)
        worker.emit(event="checkpoint", step=done, uri=worker.run.layout.uri + f"/checkpoints/step-{done:08d}",
                    blocked_s=time.perf_counter() - blocking_started)
        worker.gate.wait()
    elif eval_due:
        ray.train.report(reported)


def finish(worker: Worker, start_step: int, history: list[dict], run_started: float) -> None:
    """Check the frozen base, probe the final logits, and (rank 0) publish the adapter, summary and run
    manifest. Collective."""
    spec, engine = worker.spec, worker.engine
    base_checksum_after = frozen_weights_checksum(engine.module, zero3=worker.checkpoints.zero3)
    probe = probe_logits(engine, worker.probe_example, worker.pad_id)
    if worker.rank == 0:
        counts = worker.counts
        summary = {
            "status": "complete", "steps": spec.train.max_steps, "resumed_from_step": start_step,
            "trainable_parameters": counts.trainable, "total_parameters": counts.total,
            "trainable_percent": counts.percent, "base_checksum_before": worker.base_checksum,
            "base_checksum_after": base_checksum_after, "base_unchanged": worker.base_checksum == base_checksum_after,
            "final": history[-1] if history else {}, "wall_seconds": time.perf_counter() - run_started,
            "data": dataclasses.asdict(worker.data_report),
        }
        worker.run.finish(worker.checkpoints.last_dir, max(start_step, spec.train.max_steps), summary, probe)
        worker.emit(event="done", adapter_uri=worker.run.layout.uri + "/adapter", summary=summary)
    worker.checkpoints.discard()


def make_scheduler(optimizer, spec: JobSpec):
    from transformers import get_scheduler

    return get_scheduler(
        spec.optim.scheduler, optimizer=optimizer,
        num_warmup_steps=spec.optim.warmup_steps, num_training_steps=spec.train.max_steps,
    )


@contextlib.contextmanager
def _node_leader_first(local_rank: int):
    """Local rank 0 tokenizes (and fills the node's dataset cache) before the node's other workers read it:
    one tokenization per node instead of one per worker, as `TrainingArguments.main_process_first` does."""
    if local_rank != 0:
        dist.barrier()
    yield
    if local_rank == 0:
        dist.barrier()


def _quiet_logs() -> None:
    """Progress reaches the console through the driver; per-report INFO lines would drown it."""
    for noisy in ("botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Ray Train logs every report at INFO (from a logger named by file path); the console already
    # shows our progress line for it. Internal to Ray, so absent modules are fine.
    try:
        from ray.train.v2._internal.execution import context as ray_train_context

        ray_train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def _emit(progress, **event) -> None:
    """Console progress is best effort: training goes on if the driver's queue is gone."""
    if progress is not None:
        try:
            progress.put_nowait(event)
        except Exception as error:  # RayActorError, a full queue: the run's storage holds what matters
            logging.getLogger(__name__).warning("progress event dropped: %s", first_line(error, with_type=True))
