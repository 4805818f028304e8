"""A generated instruction dataset with real structure (multi-digit arithmetic), so loss visibly falls."""

from __future__ import annotations

import json
import random
from pathlib import Path

from orchestrator.builtin import resolve_builtin

_EXAMPLES = 4000


def arithmetic_examples(count: int = _EXAMPLES, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        result = a + b if op == "+" else a - b
        examples.append({"prompt": f"{a}{op}{b}=", "completion": f"{result}"})
    return examples


def _write_jsonl(name: str, directory: Path) -> None:
    with open(directory / "train.jsonl", "w") as out:
        for example in BUILTIN_DATASETS[name]():
            out.write(json.dumps(example) + "\n")


BUILTIN_DATASETS = {"arithmetic": arithmetic_examples}


def resolve_data_path(path: str) -> str:
    """A real data path for `path`; builtin:NAME is generated on first use."""
    built = resolve_builtin(path, "data.path", BUILTIN_DATASETS, _write_jsonl, kind="dataset")
    return str(built / "train.jsonl") if built else path
