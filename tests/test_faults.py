"""Faults on a real Ray runtime with real DeepSpeed and real SeaweedFS: a worker killed, the driver
killed, the object store down during a checkpoint upload, a checkpoint whose bytes changed, one torn.

Each run trains 12 steps with a checkpoint every 4. A fault pauses rank 0 after a step (see
orchestrator.train.faults) so that the test strikes while the run stands still; the run must then
end with the same adapter as an uninterrupted run of the same spec and seed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from safetensors.torch import load

import orchestrator
from orchestrator.spec import validate_spec
from orchestrator.storage.fs import open_storage
from orchestrator.storage.layout import RunLayout
from orchestrator.storage.manifest import is_complete, read_manifest
from orchestrator.storage.objectstore import EmbeddedObjectStore
from orchestrator.train.faults import schedule_fault
from tests.helpers import TEST_BUCKET, make_spec

pytestmark = pytest.mark.slow
JOB = "faults"


def spec_raw(storage_uri: str, endpoint_url: str | None = None, max_steps: int = 12) -> dict:
    return make_spec(storage_uri, raw=True, name=JOB, adapter={"dropout": 0.1}, optim={"scheduler": "cosine", "warmup_steps": 2},
                     train={"max_steps": max_steps, "eval_every": 4, "checkpoint_every": 4, "log_every": 1, "eval_batches": 1,
                            "max_failures": 2},
                     storage={"endpoint_url": endpoint_url})


def adapter_of(storage_uri: str, run_id: str, endpoint_url: str | None = None) -> dict[str, torch.Tensor]:
    storage = open_storage(storage_uri, endpoint_url)
    return load(storage.read_bytes(f"{RunLayout(storage, JOB, run_id).adapter_dir}/adapter_model.safetensors"))


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, f"adapter differs from the uninterrupted run by {worst:g}"


def logged_steps(storage_uri: str, run_id: str, endpoint_url: str | None = None) -> list[int]:
    storage = open_storage(storage_uri, endpoint_url)
    lines = storage.read_bytes(RunLayout(storage, JOB, run_id).metrics).decode().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The uninterrupted run every faulted run must reproduce."""
    uri = f"s3://{TEST_BUCKET}/faults-reference"
    orchestrator.run(validate_spec(spec_raw(uri)), local=False, run_id="reference", echo=print)
    return adapter_of(uri, "reference")


def start_driver(job_file: Path, run_id: str) -> subprocess.Popen:
    """`orchestrator run` in its own process, a driver of the session's Ray runtime."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(job_file), "--run-id", run_id],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_pause(faults_file: Path, timeout_s: float = 240) -> dict:
    marker = Path(f"{faults_file}.paused")
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.5)
    return json.loads(marker.read_text())


def train_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def write_job(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(reference, faults_file, s3_storage_uri, tmp_path):
    schedule_fault(faults_file, "worker-kill", step=6, pause_s=60)
    driver = start_driver(write_job(tmp_path, spec_raw(s3_storage_uri)), "worker-kill")
    assert wait_for_pause(faults_file)["step"] == 6
    workers = train_workers()
    assert len(workers) == 2
    # Its local copy of the step-4 checkpoint: a killed worker cannot remove it, its replacement does.
    left_behind = list(Path(tempfile.gettempdir()).glob(f"orchestrator-pid{workers[0].pid}-step4-*"))
    assert len(left_behind) == 1, left_behind
    os.kill(workers[0].pid, signal.SIGKILL)  # what an OOM kill or a lost node does
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    assert not left_behind[0].exists()
    restarts = [line for line in output.splitlines() if "restarting from" in line]
    assert len(restarts) == 1 and re.fullmatch(r"worker rank [01] on \S+ failed: worker process died: .+; restarting from "
                                               r"checkpoint step 4", restarts[0]), restarts
    assert_same_adapter(adapter_of(s3_storage_uri, "worker-kill"), reference)
    # The run's metrics hold each step once; the console shows which steps were trained twice:
    # those after the last checkpoint (4), at most one checkpoint interval.
    assert logged_steps(s3_storage_uri, "worker-kill") == list(range(1, 13))
    trained = [int(m) for m in re.findall(r"step\s+(\d+)/12", output)]
    repeated = sorted(step for step in set(trained) if trained.count(step) > 1)
    assert repeated == [5, 6], trained

    # A checkpoint whose bytes changed after its manifest was written is never resumed from (12), nor is one torn
    # by an upload that died half-way, its manifest missing (8).
    storage = open_storage(s3_storage_uri)
    layout = RunLayout(storage, JOB, "worker-kill")
    newest = layout.checkpoint(12)
    victim = next(p for p in storage.list_files(newest) if p.endswith(".safetensors"))
    storage.write_bytes(f"{newest}/{victim}", storage.read_bytes(f"{newest}/{victim}")[:-8] + b"\0" * 8)
    storage.fs.rm_file(f"{layout.checkpoint(8)}/manifest.json")
    assert read_manifest(storage, layout.checkpoint(8)) is None
    resumed = orchestrator.run(validate_spec(spec_raw(s3_storage_uri, max_steps=14)), local=False,
                               run_id="worker-kill", echo=print)
    assert resumed.summary["resumed_from_step"] == 4


def test_killed_driver_is_resumed_by_running_the_same_run_again(reference, faults_file, s3_storage_uri, tmp_path):
    job_file = write_job(tmp_path, spec_raw(s3_storage_uri))
    schedule_fault(faults_file, "driver-kill", step=6, pause_s=120)
    driver = start_driver(job_file, "driver-kill")
    wait_for_pause(faults_file)
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 120
    while train_workers():  # the driver's job, and with it its workers, ends with the driver
        assert time.monotonic() < deadline, "workers outlived their driver"
        time.sleep(1)
    again = start_driver(job_file, "driver-kill")
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "resuming run" in output, output[-3000:]
    summary = json.loads(open_storage(s3_storage_uri).read_bytes(
        RunLayout(open_storage(s3_storage_uri), JOB, "driver-kill").file("summary.json")))
    assert summary["resumed_from_step"] == 4
    assert_same_adapter(adapter_of(s3_storage_uri, "driver-kill"), reference)


def test_store_outage_during_a_checkpoint_upload_is_ridden_out(reference, object_store, faults_file, tmp_path):
    # A store of its own (same credentials as the session's, which the Ray workers inherited) to stop and start.
    store = EmbeddedObjectStore(tmp_path / "outage-store", buckets=(TEST_BUCKET,))
    store.access_key, store.secret_key = object_store.access_key, object_store.secret_key
    uri = f"s3://{TEST_BUCKET}/outage"
    with store:
        schedule_fault(faults_file, "outage", step=7, pause_s=3)
        driver = start_driver(write_job(tmp_path, spec_raw(uri, store.endpoint_url)), "outage")
        wait_for_pause(faults_file)
        storage = open_storage(uri, store.endpoint_url)
        before = storage.list_files(RunLayout(storage, JOB, "outage").checkpoint(4))
        store.stop()       # down while rank 0 resumes and uploads the step-8 checkpoint
        time.sleep(10)
        store.start()      # same endpoint, same data
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-3000:]
        trained = [int(m) for m in re.findall(r"step\s+(\d+)/12", output)]
        assert sorted(trained) == list(range(1, 13)), trained  # the upload waited the outage out: no restart
        storage = open_storage(uri, store.endpoint_url)
        layout = RunLayout(storage, JOB, "outage")
        assert storage.list_files(layout.checkpoint(4)) == before and is_complete(storage, layout.checkpoint(4))
        assert is_complete(storage, layout.checkpoint(12))
        assert_same_adapter(adapter_of(uri, "outage", store.endpoint_url), reference)


def test_ctrl_c_checkpoints_the_step_it_is_on_and_resume_loses_none(reference, faults_file, s3_storage_uri, tmp_path):
    """Ctrl-C in a terminal reaches the whole foreground process group: the local Ray runtime the command started
    as well as the driver. The run must checkpoint the step it is on, stop with exit code 3, and go on from there."""
    job = spec_raw(s3_storage_uri)
    job["scaling"]["cpus_per_worker"] = 1.0
    job_file = write_job(tmp_path, job)
    schedule_fault(faults_file, "ctrl-c", step=6, pause_s=8)
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "--local", str(job_file), "--run-id", "ctrl-c"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    wait_for_pause(faults_file)
    os.killpg(driver.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 3, output[-3000:]
    assert "SIGINT: checkpointing the current step, then stopping" in output
    assert re.search(r"^stopped: after step 7 of 12: its checkpoint is in \S+/checkpoints; `orchestrator run <spec> "
                     r"--run-id ctrl-c --resume` goes on from it$", output, re.MULTILINE), output[-2000:]
    storage = open_storage(s3_storage_uri)
    layout = RunLayout(storage, JOB, "ctrl-c")
    assert is_complete(storage, layout.checkpoint(7)) and not storage.exists(layout.manifest)

    resumed = orchestrator.run(validate_spec(spec_raw(s3_storage_uri)), local=False, run_id="ctrl-c", resume=True, echo=print)
    assert resumed.summary["resumed_from_step"] == 7  # no step lost
    assert_same_adapter(adapter_of(s3_storage_uri, "ctrl-c"), reference)
