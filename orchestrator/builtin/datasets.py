"""Generated datasets with real structure, so loss visibly falls: multi-digit arithmetic as prompt/completion
pairs, and conversations (arithmetic, string reversal, key → value recall across turns) as chat messages."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from orchestrator.builtin import resolve_builtin

_EXAMPLES = 4000
_CONVERSATIONS = 2000


def arithmetic_examples(count: int = _EXAMPLES, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        result = a + b if op == "+" else a - b
        examples.append({"prompt": f"{a}{op}{b}=", "completion": f"{result}"})
    return examples


def _exchange(rng: random.Random, facts: dict[str, int]) -> tuple[str, str]:
    """One user question and the assistant's answer: a sum, a reversal, or a fact stated earlier."""
    task = rng.choice(["sum", "reverse", "recall"] if facts else ["sum", "reverse"])
    if task == "sum":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a}+{b}?", f"{a + b}"
    if task == "reverse":
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 12)))
        return f"Reverse {word}.", word[::-1]
    key = rng.choice(sorted(facts))
    return f"What is {key}?", f"{key} is {facts[key]}."


def chat_examples(count: int = _CONVERSATIONS, seed: int = 0) -> list[dict[str, list]]:
    """Conversations of 1-4 exchanges, some with a system prompt holding facts to recall: lengths from ~30 to
    ~250 tokens of the byte-level tokenizer, so packing has something to do."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        messages = []
        facts = {f"k{rng.randint(0, 99)}": rng.randint(0, 999) for _ in range(rng.randint(0, 3))}
        if facts:
            stated = " ".join(f"{key} is {value}." for key, value in facts.items())
            messages.append({"role": "system", "content": f"Remember: {stated}"})
        for _ in range(rng.randint(1, 4)):
            question, answer = _exchange(rng, facts)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append({"messages": messages})
    return conversations


def _write_jsonl(name: str, directory: Path) -> None:
    with open(directory / "train.jsonl", "w") as out:
        for example in BUILTIN_DATASETS[name]():
            out.write(json.dumps(example) + "\n")


BUILTIN_DATASETS = {"arithmetic": arithmetic_examples, "chat": chat_examples}


def resolve_data_path(path: str) -> str:
    """A real data path for `path`; builtin:NAME is generated on first use."""
    built = resolve_builtin(path, "data.path", BUILTIN_DATASETS, _write_jsonl, kind="dataset")
    return str(built / "train.jsonl") if built else path
