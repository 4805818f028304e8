"""The benchmark workload: a Llama-shaped random-init model and fixed-length examples, built locally,
and the one job spec every contender trains (so that each does the same work on the same batches)."""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

# What the issue measures by default: Llama-shaped h256/L4, LoRA r8, batch 8 × 128 tokens per worker.
HIDDEN, LAYERS, SEQ, BATCH, RANK = 256, 4, 128, 8, 8
EXAMPLES = 2048


@dataclass(frozen=True)
class Workload:
    model_dir: str
    data_path: str
    hidden: int
    layers: int
    seq: int

    def base_parameters(self) -> int:
        from transformers import AutoConfig, AutoModelForCausalLM
        import torch

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.model_dir))
        return sum(p.numel() for p in model.parameters())


def build_workload(root: Path, hidden: int = HIDDEN, layers: int = LAYERS, seq: int = SEQ) -> Workload:
    """Model and data under `root` (reused when already there): byte-level tokenizer, so seq tokens ≈ seq bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from orchestrator.builtin.models import SPECIAL_TOKENS, build_tokenizer

    model_dir = root / f"llama-h{hidden}-l{layers}"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(SPECIAL_TOKENS) + 256, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                             num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                             num_key_value_heads=max(1, hidden // 64), max_position_embeddings=2048,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
        build_tokenizer().save_pretrained(model_dir)
    data_path = root / f"text-{seq}.jsonl"
    if not data_path.exists():
        rng = random.Random(0)
        # BOS + prompt + completion + EOS = seq tokens exactly: every batch is full, none is padded.
        half = (seq - 2) // 2
        with open(data_path, "w") as out:
            for _ in range(EXAMPLES):
                words = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(seq - 2))
                out.write(json.dumps({"prompt": words[:half], "completion": words[half:]}) + "\n")
    return Workload(str(model_dir), str(data_path), hidden, layers, seq)


def job_spec(workload: Workload, *, name: str, steps: int, workers: int, zero_stage: int,
             checkpoint_every: int = 0, log_every: int = 10, storage_uri: str | None = None,
             cpus_per_worker: float | None = None) -> dict:
    """The job every contender runs: LoRA r8 on all linear layers, fp32 on CPU, no evaluation until the end."""
    return {
        "name": name, "model": {"path": workload.model_dir},
        "data": {"path": workload.data_path, "max_length": workload.seq, "eval_fraction": 0.01},
        "adapter": {"method": "lora", "r": RANK, "alpha": 2 * RANK, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
        "train": {"max_steps": steps, "batch_size": BATCH, "eval_every": 0, "checkpoint_every": checkpoint_every,
                  "log_every": log_every, "eval_batches": 1},
        "deepspeed": {"zero_stage": zero_stage}, "scaling": {"num_workers": workers} | ({"cpus_per_worker": cpus_per_worker} if cpus_per_worker else {}),
        "storage": {"uri": storage_uri},
    }
