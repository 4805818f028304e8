"""A generated instruction dataset with real structure (multi-digit arithmetic), so loss visibly falls."""

from __future__ import annotations

import json
import random
from pathlib import Path

from orchestrator.builtin import BUILTIN_PREFIX, build_once, cache_home
from orchestrator.errors import PreflightError

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


def _write_jsonl(examples: list[dict[str, str]], directory: Path) -> None:
    with open(directory / "train.jsonl", "w") as out:
        for example in examples:
            out.write(json.dumps(example) + "\n")


BUILTIN_DATASETS = {"arithmetic": arithmetic_examples}


def resolve_data_path(path: str) -> str:
    """A real data path for `path`; builtin:NAME is generated on first use."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_DATASETS:
        raise PreflightError(f"data.path: unknown built-in dataset {path!r} (known: {', '.join('builtin:' + n for n in BUILTIN_DATASETS)})")
    target = cache_home() / "datasets" / name
    build_once(target, lambda staging: _write_jsonl(BUILTIN_DATASETS[name](), staging))
    return str(target / "train.jsonl")
