"""Secrets never leak: a local run with the store's credentials in the environment, through a failure
and a resume, is scanned everywhere it leaves text — console, Ray's session logs, every stored file
and the error message. (Submitted jobs: tests/test_cluster.py scans job metadata, job logs and the
head's files.) URLs with credentials in them are refused without repeating them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from orchestrator.storage.fs import open_storage
from orchestrator.train.faults import schedule_fault
from tests.helpers import MINIMAL_SPEC, assert_worker_failure_is_three_lines, make_spec

SECRET_URL_PART = "s3cr3tInUrl"


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=600, env=env)


def files_containing(root: Path, secret: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and secret in path.read_bytes().decode(errors="replace"):
            hits.append(str(path.relative_to(root)))
    return hits


@pytest.mark.slow
def test_local_run_failure_and_resume_leave_the_secret_nowhere(object_store, s3_storage_uri, tmp_path):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    faults = tmp_path / "faults.json"
    schedule_fault(faults, "secret-scan", step=3)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(make_spec(
        s3_storage_uri, base=MINIMAL_SPEC, raw=True, name="secrets", data={"max_length": 32}, scaling={"num_workers": 2},
        adapter={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        train={"max_steps": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "log_every": 1, "max_failures": 0},
    )))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ors-", dir="/tmp"))  # short: Ray's socket paths live below it
    env = {**os.environ, "ORCHESTRATOR_FAULTS": str(faults), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    try:
        failed = run_cli("run", "--local", str(job), "--run-id", "secret-scan", env=env)
        assert failed.returncode == 1 and "injected fault after step 3" in failed.stderr, failed.stderr[-2000:]
        # This run is also the end-to-end check of a worker failure's console (tests/test_worker_failure.py).
        assert_worker_failure_is_three_lines(failed, "InjectedFault: injected fault after step 3 of run secret-scan",
                                             rank=0, checkpoint=3, ray_tmp=ray_tmp)
        resumed = run_cli("run", "--local", str(job), "--run-id", "secret-scan", env=env)
        assert resumed.returncode == 0 and "resuming run" in resumed.stdout, resumed.stderr[-2000:]
        for name, result in (("failed run", failed), ("resumed run", resumed)):
            assert secret not in result.stdout + result.stderr, f"secret in the {name}'s console output"
        assert list(ray_tmp.rglob("*.log")), "Ray wrote no session logs where expected"
        assert files_containing(ray_tmp, secret) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    storage = open_storage(s3_storage_uri)
    stored = storage.list_files(storage.root)
    assert any(p.endswith("runs/secrets/secret-scan/manifest.json") for p in stored)
    assert any("metrics.jsonl" in p for p in stored) and any(p.endswith("spec.yaml") for p in stored)
    for path in stored:
        assert secret not in storage.read_bytes(f"{storage.root}/{path}").decode(errors="replace"), path


@pytest.mark.parametrize("args", [
    ("validate", "--set", f"storage.uri=s3://AKIAEXAMPLE:{SECRET_URL_PART}@bucket/runs"),
    # ~4 s: `run` gets as far as preflight, which tries to read the data
    pytest.param(("run", "--set", f"data.path=s3://AKIAEXAMPLE:{SECRET_URL_PART}@bucket/data.jsonl"), marks=pytest.mark.slow),
    ("submit", "--set", "storage.uri=s3://bucket/runs", "--address", f"http://admin:{SECRET_URL_PART}@127.0.0.1:9"),
], ids=["storage-uri", "data-path", "cluster-address"])
def test_urls_with_credentials_are_refused_without_repeating_them(args, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(MINIMAL_SPEC))
    command, *rest = args
    result = run_cli(command, str(job), *rest, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr[-2000:]
    assert SECRET_URL_PART not in result.stdout + result.stderr
