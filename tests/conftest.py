"""Shared, session-scoped services: one SeaweedFS S3 server (auth on) and one Ray runtime.

A test that uses either is slow: starting them takes ~12 s on 2 cores, and `pytest -m "not slow"` is the
quick unit tier. pytest_collection_modifyitems marks such tests, so that none can forget the mark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.launch.runtime import start_local_ray
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
