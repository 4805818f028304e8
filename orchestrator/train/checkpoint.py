"""Adapter checkpoints: PEFT-format adapter (gathered under ZeRO-3) + the adapter's training state + RNG.

Layout of checkpoints/step-N/ in storage:
  adapter/adapter_config.json, adapter/adapter_model.safetensors   (rank 0, loadable by PEFT alone)
  optimizer/state.safetensors, optimizer/state.json                (rank 0: whole masters, moments, LR schedule;
                                                                    loads on any worker count, train/optim_state.py)
  rng/rank-R.pt, trainer_state.json
  manifest.json                                                    (written last, by rank 0)
"""

from __future__ import annotations

import json
import random
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from orchestrator.train import optim_state
from orchestrator.train.engine import trim_freed_heap
from orchestrator.train.scratch import scratch_dir

ADAPTER_FLAG = "orchestrator_adapter"


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter the adapter added, trainable or frozen (LoRA-FA's A), flagged at attach time."""
    return [p for p in model.parameters() if getattr(p, ADAPTER_FLAG, False)]


def save_adapter(model, directory: Path, zero3: bool, is_writer: bool, export) -> None:
    """Write the adapter as stock PEFT loads it. `export(model)` → (state dict, PeftConfig).

    Collective under ZeRO-3: every rank must call it, since the adapter is gathered first. The writer writes
    while the adapter is gathered, from the gathered values themselves: no second whole copy of the adapter
    on top of the worker's peak.
    """
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(adapter_parameters(model), modifier_rank=None)
    else:
        gather = nullcontext()
    with gather:
        masters = fp32_masters(model)  # collective under ZeRO-2/3: every rank, before the writer's early return
        if not is_writer:
            return
        with _values_swapped(masters):
            _write_adapter(*export(model), directory)


def _write_adapter(state: dict[str, torch.Tensor], config, directory: Path) -> None:
    from safetensors.torch import save_file

    # As PEFT keeps an adapter on a bf16 base (autocast_adapter_dtype): fp32, whatever the training precision.
    # (A wider dtype, as in fp64 tests, is kept.)
    state = {name: tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor for name, tensor in state.items()}
    empty = [name for name, tensor in state.items() if tensor.numel() == 0]
    if not state or empty:
        # PEFT + ZeRO-3 is known to save empty adapters when parameters are not gathered.
        raise RuntimeError(f"refusing to save an empty adapter (empty tensors: {empty[:3]})")
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({name: tensor.contiguous() for name, tensor in state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def fp32_masters(model) -> dict[torch.nn.Parameter, torch.Tensor]:
    """{trainable parameter kept in bf16: DeepSpeed's fp32 master copy of it}, whole on every rank. Collective
    under ZeRO-2/3. Empty in fp32 runs, where the parameter is its own master."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for parameter in adapter_parameters(model):
        if parameter.requires_grad and parameter.dtype != torch.float32:
            master = safe_get_full_fp32_param(parameter)
            if master is not None:
                masters[parameter] = master.detach().cpu().view(parameter.ds_shape if hasattr(parameter, "ds_shape") else parameter.shape)
    return masters


@contextmanager
def _values_swapped(masters: dict[torch.nn.Parameter, torch.Tensor]):
    """The parameters hold their fp32 master values inside the block (the export reads the module)."""
    originals = {parameter: parameter.data for parameter in masters}
    try:
        for parameter, master in masters.items():
            parameter.data = master
        yield
    finally:
        for parameter, original in originals.items():
            parameter.data = original


@dataclass
class TrainerState:
    """Where training stands: optimizer steps done and tokens trained on (all workers). Saved in every
    checkpoint as trainer_state.json, {"step": …, "tokens": …}."""

    step: int = 0
    tokens: int = 0

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        return cls(step=data["step"], tokens=data.get("tokens", 0))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def save_training_state(engine, directory: Path, rank: int, trainer_state: TrainerState) -> None:
    """The adapter's training state (whole, on rank 0) and each rank's RNG state, for an exact resume. Collective."""
    optim_state.save_training_state(engine, directory / "optimizer", is_writer=rank == 0)
    rng_dir = directory / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        rng_dir / f"rank-{rank}.pt",
    )
    if rank == 0:
        (directory / "trainer_state.json").write_text(trainer_state.to_json())


def load_training_state(engine, directory: Path, rank: int) -> TrainerState:
    """Restore what save_training_state wrote, on any worker count; returns the trainer state. A rank the
    saving run did not have keeps its own RNG (only dropout draws from it)."""
    if (directory / "optimizer").exists():
        optim_state.load_training_state(engine, directory / "optimizer")
    else:  # written by an earlier version: DeepSpeed's per-rank shards, which load on the same worker count only
        engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    rng_file = directory / "rng" / f"rank-{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return TrainerState.from_json((directory / "trainer_state.json").read_text())


@dataclass
class Checkpointer:
    """One worker's checkpoints: what every save shares (engine, the run's storage, rank, ZeRO-3, the
    method's export) and the local copy of the latest one, which the run's end publishes its adapter from."""

    engine: Any
    run: Any  # storage_io.RunStorage: uploads through Ray, then writes the manifest
    rank: int
    zero3: bool
    export: Callable
    last_dir: Optional[Path] = None

    def save(self, state: TrainerState, metrics: dict, history: list[dict]) -> Path:
        """Save adapter + engine state locally, upload through Ray, then write the manifest. Collective.
        Synchronous on purpose: "checkpoint saved" means the checkpoint is complete in storage, so a
        failure right after it resumes from it (a background upload lost it in CI; see docs/benchmarks.md)."""
        self.discard()
        local = scratch_dir(f"step{state.step}-rank{self.rank}")
        save_adapter(self.engine.module, local / "adapter", zero3=self.zero3, is_writer=self.rank == 0, export=self.export)
        save_training_state(self.engine, local, self.rank, state)
        trim_freed_heap()
        self.run.report_checkpoint(local, state.step, metrics, history, self.rank)
        self.last_dir = local
        return local

    def discard(self) -> None:
        """Remove the local copy of the latest checkpoint (it is in storage)."""
        if self.last_dir is not None:
            shutil.rmtree(self.last_dir, ignore_errors=True)
            self.last_dir = None
