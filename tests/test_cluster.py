"""Cluster mode against a real Ray head (`ray start --head`, token auth) and the real S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.launch.cluster_client import connect
from orchestrator.storage.fs import open_storage
from tests.helpers import TEST_BUCKET, make_spec
from tests.ray_head import free_ports, start_head, stop_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(object_store):
    head = start_head(num_cpus=3)
    yield head
    stop_head(head)


@pytest.fixture
def with_token(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray_head


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


# Shorter than the training job: 6 steps of batch 4, adapters on q and v only.
CLUSTER_JOB = make_spec(raw=True, name="cluster-job", adapter={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                        train={"max_steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3, "log_every": 1})


def write_job(tmp_path: Path, storage_uri: str, **sections) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(make_spec(storage_uri, base=CLUSTER_JOB, raw=True, **sections)))
    return path


def submission_id(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("submitted "))


def test_submit_follow_succeeds_with_checkpoint_in_store_and_no_secret_anywhere(with_token, object_store, s3_storage_uri, tmp_path):
    job = write_job(tmp_path, s3_storage_uri)
    done = cli("submit", str(job), "--address", with_token.url, "--follow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sid = submission_id(done.stdout)
    assert f"{sid}: SUCCEEDED" in done.stdout and "dashboard: " + with_token.url in done.stdout
    results = next(line.split()[-1] for line in done.stdout.splitlines() if line.strip().startswith("results:"))
    fs, prefix = open_storage(s3_storage_uri, None).fs, results.removeprefix("s3://")
    assert fs.exists(f"{prefix}/manifest.json") and fs.exists(f"{prefix}/adapter/adapter_model.safetensors")
    assert any("step-" in p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/checkpoints"))
    assert json.loads(fs.cat(f"{prefix}/summary.json"))["steps"] == 6

    listed = cli("list", "--address", with_token.url)
    assert listed.returncode == 0 and sid in listed.stdout and "SUCCEEDED" in listed.stdout
    status = cli("status", sid, "--address", with_token.url)
    assert "SUCCEEDED" in status.stdout and results in status.stdout

    # The store's secret reached the job (it wrote to the store) but shows up nowhere we or Ray keep.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    info = connect(with_token.url).client.get_job_info(sid)
    logs = cli("logs", sid, "--address", with_token.url).stdout
    stored = "".join(fs.cat(p).decode(errors="replace") for p in fs.find(prefix) if not p.endswith((".safetensors", ".pt", ".bin")))
    for where, text in {"submit output": done.stdout + done.stderr, "job metadata": json.dumps(info.metadata),
                        "job logs": logs, "stored run files": stored, "list/status": listed.stdout + status.stdout}.items():
        assert secret not in text, f"secret found in {where}"
    # On the head, only the job's own copy of its working_dir holds it (that is how it travels), not a log.
    holders = with_token.files_containing(secret)
    assert holders and all("/working_dir_files/_ray_pkg_" in h and "/orchestrator_credentials.json:" in h for h in holders), holders
    assert "step 6" in logs or "done: 6 steps" in logs


def test_submit_then_stop_gives_stopped(with_token, s3_storage_uri, tmp_path):
    job = write_job(tmp_path, s3_storage_uri, train={"max_steps": 5000, "checkpoint_every": 1000, "eval_every": 1000})
    submitted = cli("submit", str(job), "--address", with_token.url)
    assert submitted.returncode == 0, submitted.stderr
    sid = submission_id(submitted.stdout)
    client = connect(with_token.url).client
    deadline = time.monotonic() + 180
    while "step " not in client.get_job_logs(sid) and time.monotonic() < deadline:
        time.sleep(2)
    stopped = cli("stop", sid, "--address", with_token.url)
    assert stopped.returncode == 0 and f"{sid}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "STOPPED" in cli("status", sid, "--address", with_token.url).stdout
    again = cli("stop", sid, "--address", with_token.url)
    assert "already ended: STOPPED" in again.stdout


def test_submit_tune_runs_the_search_on_the_cluster(with_token, object_store, s3_storage_uri, tmp_path):
    job = write_job(tmp_path, s3_storage_uri, scaling={"num_workers": 1},
                    train={"max_steps": 4, "eval_every": 2, "checkpoint_every": 4},
                    tune={"name": "cluster-search", "num_samples": 1, "scheduler": {"type": "fifo"}, "space": {"optim.lr": {"grid": [1e-3, 3e-3]}}})
    done = cli("submit", "--tune", str(job), "--address", with_token.url, "--follow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    board = open_storage(s3_storage_uri, None).fs.cat(f"{s3_storage_uri.removeprefix('s3://')}/tune/cluster-search/leaderboard.csv").decode()
    assert len(board.strip().splitlines()) == 3  # header + 2 trials


def test_missing_or_wrong_token_is_one_line_exit_2(ray_head, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    missing = cli("list", "--address", ray_head.url, timeout=60)
    assert missing.returncode == 2 and "requires a Ray auth token" in missing.stderr
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
    wrong = cli("list", "--address", ray_head.url, timeout=60)
    assert wrong.returncode == 2 and "refused the Ray auth token" in wrong.stderr
    for result in (missing, wrong):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unknown_job_id_is_one_line_exit_2(with_token):
    result = cli("status", "no-such-job", "--address", with_token.url, timeout=60)
    assert result.returncode == 2 and "no job 'no-such-job'" in result.stderr


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:{port}", "connection refused"),
    ("http://10.255.255.1:8265", "10.255.255.1"),  # unroutable: a timeout or an unreachable network, never a hang
    ("ray://127.0.0.1:10001", "Ray Client address"),
])
def test_unreachable_cluster_is_one_line_exit_2_within_seconds(address, message, tmp_path):
    job = write_job(tmp_path, f"s3://{TEST_BUCKET}/unreachable")
    started = time.monotonic()
    result = cli("submit", str(job), "--address", address.format(port=free_ports(1)[0]), timeout=60)
    # Python and Ray's imports take a few seconds on 2 cores; the probe itself waits at most 5 s.
    assert time.monotonic() - started < 30
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_submit_warns_when_the_cluster_cannot_hold_the_job(with_token, s3_storage_uri, tmp_path):
    job = write_job(tmp_path, s3_storage_uri, scaling={"num_workers": 4})  # 4 CPUs; the head has 3
    submitted = cli("submit", str(job), "--address", with_token.url)
    assert submitted.returncode == 0, submitted.stderr
    assert "warning: the cluster cannot hold this job right now: needs CPU 4 (cluster has 3)" in submitted.stdout, submitted.stdout
    stopped = cli("stop", submission_id(submitted.stdout), "--address", with_token.url)
    assert "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
