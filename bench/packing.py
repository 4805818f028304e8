"""Packing's throughput (issue 19): real (non-pad) tokens per second on examples of varied length, packed ÷
unpacked, each a real `orchestrator run --local` on the same model, examples, batch size and steps."""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

from bench.perf import Bench, Figure
from bench.workload import job_spec

MAX_LENGTH = 512


def variable_length_data(root: Path, examples: int = 4000, shortest: int = 20, longest: int = 400, seed: int = 0) -> Path:
    """prompt/completion rows of `shortest`..`longest` tokens (byte-level tokenizer: a character is a token, plus
    BOS and EOS), log-uniform: many short examples and a few long ones, as instruction data has them."""
    path = root / f"varied-{examples}-{shortest}-{longest}.jsonl"
    if not path.exists():
        rng = random.Random(seed)
        with open(path, "w") as out:
            for _ in range(examples):
                length = round(math.exp(rng.uniform(math.log(shortest), math.log(longest)))) - 2
                text = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(length))
                out.write(json.dumps({"prompt": text[: length // 4], "completion": text[length // 4:]}) + "\n")
    return path


def packing_ratio(path: Path, max_length: int = MAX_LENGTH) -> tuple[int, int, float]:
    """(examples, packed rows, fill of the rows) for the data at `path`, packed as the run packs them."""
    from orchestrator.train.packing import pack_batch

    lengths = [len(row["prompt"]) + len(row["completion"]) + 2 for row in map(json.loads, path.read_text().splitlines())]
    ids = [[0] * length for length in lengths]
    rows = pack_batch({"input_ids": ids, "labels": ids}, max_length)["input_ids"]
    return len(lengths), len(rows), sum(lengths) / (max_length * len(rows))


# The same steps in one process, packed and unpacked alternating, so that whatever else runs on the machine
# slows both alike: the project's data pipeline, model and LoRA, a plain AdamW step.
_INTERLEAVED = """
import json, sys, time, torch
from orchestrator.spec import validate_spec
from orchestrator.train.data import BatchSchedule, collate, prepare_data, real_tokens
from orchestrator.train.model import build_adapted_model, load_tokenizer
raw, steps = json.loads(sys.argv[1]), int(sys.argv[2])
tokenizer = load_tokenizer(raw["model"]["path"])
specs = {packed: validate_spec({**raw, "data": {**raw["data"], "packing": packed}}) for packed in (False, True)}
rows = {packed: prepare_data(spec, spec.data.path, None, tokenizer).train for packed, spec in specs.items()}
torch.manual_seed(0)
model, _ = build_adapted_model(specs[True], raw["model"]["path"], torch.float32)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
totals = {packed: [0, 0.0] for packed in rows}
for step in range(steps):
    for packed, dataset in rows.items():
        batch_rows = [dataset[i] for i in BatchSchedule(len(dataset), 8, 1, 1, 0, seed=0).indices(step, 0)]
        started = time.perf_counter()
        model(**collate(batch_rows, tokenizer.pad_token_id), use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # warm-up
            totals[packed][0] += real_tokens(batch_rows)
            totals[packed][1] += time.perf_counter() - started
print(json.dumps({str(packed): tokens / seconds for packed, (tokens, seconds) in totals.items()}))
"""


def packing(bench: Bench) -> list[Figure]:
    """1 worker, ZeRO-0, batch 8 rows either way: unpacked rows are padded to the longest in their batch."""
    import subprocess

    from bench.measure import python

    workload, data = bench.workload(), variable_length_data(bench.root)
    rates = {}
    for packed in (False, True):
        spec = job_spec(workload, name="bench-packing", steps=bench.steps, workers=1, zero_stage=0)
        spec["data"] |= {"path": str(data), "max_length": MAX_LENGTH, "packing": packed}
        rates[packed] = bench.orchestrator(spec, f"packing-{packed}").steady_tokens_per_s(bench.warmup_steps)
    examples, rows, fill = packing_ratio(data)
    done = subprocess.run(python("-c", _INTERLEAVED, json.dumps(spec), str(max(12, bench.steps // 5))),
                          capture_output=True, text=True, check=True)
    alternating = {key == "True": rate for key, rate in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    return [
        Figure("packing_real_tokens_per_s_packed_vs_unpacked", rates[True] / rates[False], ">=", 1.8, "ratio",
               f"orchestrator run --local each: {rates[True]:,.0f} vs {rates[False]:,.0f} real tok/s; {examples:,} "
               f"examples of 20-400 tokens in {rows:,} rows of {MAX_LENGTH} ({examples / rows:.2f} per row, "
               f"{fill:.1%} full)"),
        Figure("packing_real_tokens_per_s_alternating_steps", alternating[True] / alternating[False], ">=", 1.8, "ratio",
               f"one process, packed and unpacked steps alternating: {alternating[True]:,.0f} vs "
               f"{alternating[False]:,.0f} real tok/s"),
    ]
