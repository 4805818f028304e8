"""The data check's cost (issue 23): preflight reads every row of a 1M-row file through the row rule, in a fresh
process, beside what reading the same file into `datasets` costs (what the check did before); and how soon it
stops at a bad row near the start."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bench.measure import python
from bench.perf import Bench, Figure

_CHECK = """
import json, sys, time
started = time.perf_counter()
from orchestrator.builtin.models import build_tokenizer
from orchestrator.errors import PreflightError
from orchestrator.spec import DataSpec
from orchestrator.train.data import check_rows
path, kind = sys.argv[1], sys.argv[2]
imported = time.perf_counter()
try:
    if kind == "datasets":
        import datasets
        datasets.disable_progress_bars()
        rows = len(datasets.load_dataset("json", data_files=path, split="train", cache_dir=sys.argv[3]))
    else:
        rows = check_rows(path, DataSpec(path=path), "data.path", build_tokenizer).rows
except PreflightError as error:
    rows = str(error)
print(json.dumps({"seconds": time.perf_counter() - imported, "rows": rows}))
"""


def _write(path: Path, rows: int, row, bad_at: int | None = None) -> Path:
    if not path.exists():
        with open(path, "wb") as out:
            for number in range(1, rows + 1):
                out.write('{"prompt": "café", "completion": "x"}\n'.encode("latin-1") if number == bad_at
                          else (json.dumps(row(number)) + "\n").encode())
    return path


def data_check(bench: Bench, rows: int = 1_000_000) -> list[Figure]:
    pairs = _write(bench.root / f"pairs-{rows}.jsonl", rows, lambda i: {"prompt": f"{i % 97}+{i % 89}= please add",
                                                                          "completion": str(i % 97 + i % 89)})
    chats = _write(bench.root / f"chats-{rows}.jsonl", rows, lambda i: {"messages": [
        {"role": "system", "content": "You add numbers."}, {"role": "user", "content": f"{i % 97}+{i % 89}?"},
        {"role": "assistant", "content": str(i % 97 + i % 89)}]})
    bad = _write(bench.root / f"bad-{rows}.jsonl", rows, lambda i: {"prompt": f"{i}+1=", "completion": str(i + 1)}, bad_at=101)

    def measure(path: Path, kind: str = "check") -> dict:
        cache = bench.root / f"hf-datasets-{os.getpid()}-{path.stem}"
        done = subprocess.run(python("-c", _CHECK, str(path), kind, str(cache)), capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    pair_check, chat_check, stop = measure(pairs), measure(chats), measure(bad)
    loaded = measure(pairs, "datasets")
    assert pair_check["rows"] == chat_check["rows"] == loaded["rows"] == rows and "row 101" in stop["rows"]
    return [
        Figure("data_check_1m_prompt_completion_rows", pair_check["seconds"], "<=", 10, "s",
               f"{rows:,} rows, {pairs.stat().st_size / 1e6:.0f} MB; reading them into datasets (the check before): "
               f"{loaded['seconds']:.1f} s"),
        Figure("data_check_1m_chat_rows", chat_check["seconds"], "<=", 15, "s",
               f"{rows:,} conversations of 3 messages, {chats.stat().st_size / 1e6:.0f} MB, template tried once per "
               f"sequence of roles"),
        Figure("data_check_stops_at_a_bad_row", stop["seconds"], "<=", 1, "s", f"row 101 of {rows:,} is latin-1"),
    ]
