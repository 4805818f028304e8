"""End to end on CPU: 2 Ray Train workers, real DeepSpeed, real SeaweedFS; ZeRO-2 and resume. (ZeRO-3 runs, their
gathered adapters checked against an independent replay, are tests/test_methods_matrix.py's.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import orchestrator
from orchestrator.storage.manifest import is_complete
from orchestrator.train.model import frozen_weights_checksum
from tests.helpers import (
    assert_adapter_reproduces_trained_logits, assert_no_op_was_built, assert_run_manifest_matches_files, download_run,
    make_spec,
)

pytestmark = pytest.mark.slow


def test_zero2_run_trains_only_the_adapter_and_stores_everything(ray_session, s3_storage_uri, tiny_llama_path, tmp_path,
                                                                  torch_extensions_dir):
    result = orchestrator.run(make_spec(s3_storage_uri), run_id="zero2", echo=print)
    assert_no_op_was_built(torch_extensions_dir)
    _assert_only_the_actors_a_run_needs()
    summary = result.summary
    assert summary["status"] == "complete" and summary["steps"] == 12
    base_checksum = frozen_weights_checksum(_load_base(tiny_llama_path))
    assert summary["base_checksum_before"] == summary["base_checksum_after"] == base_checksum
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]

    layout, run_dir = download_run(result, tmp_path)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6, 9, 12]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3, "loss must fall"
    assert "eval_loss" in metrics[1] and "eval_loss" in metrics[3]
    assert layout.checkpoint_steps() == [6, 12]
    assert all(is_complete(layout.storage, layout.checkpoint(step)) for step in (6, 12))
    stored_spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert stored_spec["storage"]["uri"] == s3_storage_uri
    assert_adapter_reproduces_trained_logits(tiny_llama_path, run_dir)
    assert_run_manifest_matches_files(run_dir)

    # Its checkpoints belong to this adapter: another one is refused before anything trains.
    with pytest.raises(orchestrator.JobSpecError, match=r"adapter: differs from the spec stored with run zero2"):
        orchestrator.run(make_spec(s3_storage_uri, adapter={"r": 4}, train={"max_steps": 18}), run_id="zero2", echo=print)

    # The same run started again with more steps resumes from its last checkpoint.
    resumed = orchestrator.run(make_spec(s3_storage_uri, train={"max_steps": 18}), run_id="zero2", echo=print)
    assert resumed.summary["resumed_from_step"] == 12 and resumed.summary["steps"] == 18
    steps_seen = [event["step"] for event in resumed.events if event.get("event") == "step"]
    assert steps_seen and steps_seen[0] == 15, "training continued after step 12, not from 0"
    _, run_dir = download_run(resumed, tmp_path / "again")
    history = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history == [3, 6, 9, 12, 15, 18]
    assert_run_manifest_matches_files(run_dir)

    # Starting it once more with nothing left to do changes nothing.
    again = orchestrator.run(make_spec(s3_storage_uri, train={"max_steps": 18}), run_id="zero2", echo=print)
    assert again.summary == resumed.summary


def _assert_only_the_actors_a_run_needs() -> None:
    """Every actor is a process that imports Ray (and its class's module) on the way to the first step: no Ray Data
    manager, as a run passes no Ray Dataset (tests/test_control.py: the stop request's process imports no torch)."""
    from ray.util.state import list_actors

    classes = {actor.class_name for actor in list_actors(limit=10_000)}
    assert "RayTrainWorker" in classes and "StopRequest" in classes, classes
    assert "DatasetManager" not in classes, "a run started Ray Train's dataset manager"


def _load_base(model_path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.requires_grad_(False)
    return model
