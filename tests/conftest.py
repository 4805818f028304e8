"""Shared, session-scoped services: one SeaweedFS S3 server (auth on) and one Ray runtime.

A test that uses either is slow: starting them takes ~12 s on 2 cores, and `pytest -m "not slow"` is the
quick unit tier. pytest_collection_modifyitems marks such tests, so that none can forget the mark."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from orchestrator.launch.runtime import LOCAL_RAY_ENV, start_local_ray
from orchestrator.storage.objectstore import EmbeddedObjectStore, exported_env
from tests.helpers import TEST_BUCKET

SERVICES = ("object_store", "ray_session")


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if any(service in item.fixturenames for service in SERVICES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3 server; its credentials are exported the standard AWS way, as a user would. (Slow.)"""
    store = EmbeddedObjectStore(tmp_path_factory.mktemp("seaweedfs"), buckets=(TEST_BUCKET,))
    with store, exported_env(store.env()):
        yield store


@pytest.fixture(scope="session")
def faults_file(tmp_path_factory) -> Path:
    """Where tests schedule injected worker failures (orchestrator.train.faults); workers inherit its path."""
    return tmp_path_factory.mktemp("faults") / "faults.json"


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> Path:
    """Where torch would JIT-build a DeepSpeed op; empty, so that a test can show that training builds none."""
    return tmp_path_factory.mktemp("torch_extensions")


@pytest.fixture(scope="session")
def ray_session(object_store, faults_file, torch_extensions_dir):
    """One Ray runtime for every integration test, started after the S3 credentials are exported
    so that its worker processes inherit them. (Slow.)"""
    import ray

    os.environ["TORCH_EXTENSIONS_DIR"] = str(torch_extensions_dir)
    os.environ["ORCHESTRATOR_FAULTS"] = str(faults_file)
    # A local runtime, as `run --local` starts one: Train's helpers that only a cluster needs stay off (about a
    # quarter of a short run's time on 2 cores). Subprocesses that start a cluster drop these variables.
    with exported_env({k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ}):
        start_local_ray(num_cpus=2)
        yield
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    from orchestrator.builtin.models import resolve_model_path

    return resolve_model_path("builtin:tiny-llama")


@pytest.fixture
def s3_storage_uri(object_store, request) -> str:
    """A fresh prefix in the test bucket for each test."""
    return f"s3://{TEST_BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


@pytest.fixture(scope="session")
def _one_rank_process_group():
    """torch.distributed (gloo) with one rank in this process, for the whole session: DeepSpeed keeps the first
    group it sees for the rest of the process, so a second one would not be used. Yields its rank variables."""
    import torch.distributed as dist

    from orchestrator.train.engine import prepare_deepspeed

    prepare_deepspeed(use_gpu=False)  # before DeepSpeed's import: it picks its accelerator then
    import deepspeed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    variables = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with exported_env(variables):  # Ray workers started later inherit the environment: no rank variables after
        dist.init_process_group("gloo")
        deepspeed.init_distributed()
    yield variables
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_rank_group(_one_rank_process_group):
    """DeepSpeed in-process with one rank, for a test module (DeepSpeed reads the rank variables); ZeRO-3's
    replacement of torch.nn.functional.linear (DeepSpeed's memory-efficient linear) ends with the module."""
    import torch.nn.functional as F

    linear = F.linear
    with exported_env(_one_rank_process_group):
        yield
    F.linear = linear
