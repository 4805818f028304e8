"""The user's path: `orchestrator run --local` with no storage starts its own Ray and SeaweedFS server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _run_uri_from(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("final adapter: "))
    return line.removeprefix("final adapter: ").removesuffix("/adapter")


@pytest.mark.slow
def test_cli_export_of_a_local_run_adapter_and_merged(tmp_path):
    """Run a VeRA job locally with no storage (its own Ray and embedded store), then export it twice through the
    CLI; both exports load with stock PEFT / transformers alone. Bad exports exit 2 and write nothing. (The demo
    job itself runs in tests/test_quickstart.py.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["ORCHESTRATOR_STORE_DIR"] = str(tmp_path / "store")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, env=env, timeout=600)

    trained = cli("run", "--local", str(REPO / "jobs" / "vera.yaml"), "--set", "train.max_steps=4",
                  "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "train.log_every=2")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    out = trained.stdout
    assert "model ready: trainable" in out and "%" in out
    assert "step      4/4 | loss" in out and "tok/s" in out and "ETA" in out
    assert "final adapter: s3://orchestrator/runs/" in out
    assert list((tmp_path / "store").rglob("*")), "the embedded store keeps its data where the user can find it"
    run_uri = _run_uri_from(trained.stdout)

    exported = cli("export", run_uri, "--out", str(tmp_path / "adapter"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    merged = cli("export", run_uri, "--out", str(tmp_path / "merged"), "--merged")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert "merged model checked against the trained model's logits" in merged.stdout

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from orchestrator.builtin.models import resolve_model_path

    ids = torch.arange(3, 20)[None]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama")),
                                        str(tmp_path / "adapter")).eval()
    full = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    missing = cli("export", run_uri.rsplit("/", 1)[0] + "/no-such-run", "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no complete run there" in missing.stderr
    assert not (tmp_path / "x").exists()
    taken = cli("export", run_uri, "--out", str(tmp_path / "adapter"))
    assert taken.returncode == 2 and "already exists and is not an empty directory" in taken.stderr
