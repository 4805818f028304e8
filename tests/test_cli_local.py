"""The user's path: `orchestrator run --local` with no storage starts its own Ray and SeaweedFS server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import orchestrator
from orchestrator.storage.fs import open_storage
from tests.test_local_run import job

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cli_local_demo_runs_with_embedded_store(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["ORCHESTRATOR_STORE_DIR"] = str(tmp_path / "store")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "--local", str(REPO / "jobs" / "local-smoke.yaml"),
         "--set", "train.max_steps=10", "--set", "train.eval_every=5", "--set", "train.checkpoint_every=5"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "model ready: trainable" in out and "%" in out
    assert "step     10/10 | loss" in out and "tok/s" in out and "ETA" in out
    assert "final adapter: s3://orchestrator/runs/local-smoke/" in out
    stored = list((tmp_path / "store").rglob("*"))
    assert stored, "the embedded store keeps its data where the user can find it"


def test_target_modules_that_match_nothing_fail_before_anything_is_written(object_store, s3_storage_uri):
    spec = job(s3_storage_uri, adapter={"target_modules": ["query", "value"]})
    with pytest.raises(orchestrator.PreflightError, match=r"adapter.target_modules: \['query', 'value'\] match no linear layer .*q_proj"):
        orchestrator.run(spec, echo=print)
    assert open_storage(s3_storage_uri).list_files(open_storage(s3_storage_uri).root) == []


def test_rank_larger_than_a_layer_is_refused(object_store, s3_storage_uri):
    with pytest.raises(orchestrator.PreflightError, match="adapter.r: 512 is larger than the smallest adapted layer dimension"):
        orchestrator.run(job(s3_storage_uri, adapter={"r": 512}), echo=print)


def test_missing_model_path_is_one_line(object_store, s3_storage_uri, tmp_path):
    spec = job(s3_storage_uri)
    spec.model.path = str(tmp_path / "no-model")
    with pytest.raises(orchestrator.PreflightError, match="model.path: .*no-model is not a loadable model"):
        orchestrator.run(spec, echo=print)
