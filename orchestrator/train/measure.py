"""What the worker loop measures: the train loss and throughput between two logs, the evaluation loss,
and the final logits probe. Each is collective across workers (all ranks call it together)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.train import data as data_lib


@dataclass
class LossWindow:
    """This worker's train loss and tokens since the last log."""

    # A device tensor once a micro-step has run: `.item()` every step would wait for the GPU.
    loss_sum: Any = 0.0
    micro_steps: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double()
        self.micro_steps += 1

    def drain(self, device) -> dict[str, float | int]:
        """Mean train loss, tokens/s and tokens since the last log, summed over all workers; starts a new
        window. Collective."""
        totals = torch.tensor([0.0, self.micro_steps, self.tokens], dtype=torch.float64, device=device)
        totals[0] += self.loss_sum  # a device tensor (or 0.0 for an empty window)
        dist.all_reduce(totals)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.loss_sum, self.micro_steps, self.tokens, self.started = 0.0, 0, 0, time.perf_counter()
        return {"loss": float(totals[0] / totals[1]), "tokens_per_s": float(totals[2] / elapsed), "tokens": int(totals[2])}


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
    release_prefetched(engine)
    engine.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def release_prefetched(engine) -> None:
    """ZeRO-3 prefetches the parameters it expects a step to use next; forwards without a backward (evaluation,
    the probe) leave some of them in flight, and an explicit gather right after (a checkpoint's adapter,
    Delta-LoRA's snapshot) then fails on them. Wait for them and partition everything again (DeepSpeed's
    `empty_partition_cache`, which ZeRO-3's optimizer alone has). Collective under ZeRO-3."""
    if hasattr(engine.optimizer, "empty_partition_cache"):
        engine.empty_partition_cache()


def probe_logits(engine, example, pad_id: int) -> dict[str, torch.Tensor]:
    """The trained model's logits at the last positions of one example, so anyone can check that the
    exported adapter reproduces the trained model. Collective under ZeRO-3 (every rank runs it)."""
    batch = {k: v.to(engine.device) for k, v in data_lib.collate([example], pad_id).items()}
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    release_prefetched(engine)
    return {"input_ids": batch["input_ids"][0].cpu(), "logits": logits[0, -4:].float().cpu()}
