"""End to end on CPU: 2 Ray Train workers, real DeepSpeed, real SeaweedFS; ZeRO-2, ZeRO-3 and resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

import orchestrator
from orchestrator.spec import validate_spec
from orchestrator.storage.fs import open_storage
from orchestrator.storage.layout import RunLayout
from orchestrator.storage.manifest import is_complete, read_manifest
from orchestrator.train.model import frozen_weights_checksum

pytestmark = pytest.mark.slow


def job(storage_uri: str, **overrides) -> orchestrator.JobSpec:
    raw = {
        "name": "it",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"path": "builtin:arithmetic", "max_length": 32},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"max_steps": 12, "batch_size": 8, "eval_every": 6, "checkpoint_every": 6, "log_every": 3, "eval_batches": 2},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "storage": {"uri": storage_uri},
    }
    for section, fields in overrides.items():
        # Another adapter method has other fields: replace the section instead of merging into LoRA's.
        replace = section == "adapter" and fields.get("method", "lora") != "lora"
        raw[section] = fields if replace else {**raw.get(section, {}), **fields}
    return validate_spec(raw)


def download_run(result, tmp_path: Path) -> tuple[RunLayout, Path]:
    storage = open_storage(result.run_uri.split("/runs/")[0])
    job_name, run_id = result.run_uri.split("/runs/")[1].split("/")
    layout = RunLayout(storage, job_name, run_id)
    local = tmp_path / "run"
    storage.download_dir(layout.run_dir, local)
    return layout, local


def assert_adapter_reproduces_trained_logits(model_path: str, run_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == model_path, "PEFT alone must find the base model"
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    probe = load_file(run_dir / "probe_logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0, -4:]
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in weights.items()), "B left at zero: nothing trained"


def assert_run_manifest_matches_files(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert {"torch", "ray", "deepspeed", "peft", "transformers"} <= set(manifest["packages"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((run_dir / name).read_bytes()).hexdigest() == digest, name
    assert "adapter/adapter_model.safetensors" in manifest["files"]
    assert "spec.yaml" in manifest["files"] and "metrics.jsonl" in manifest["files"]


def assert_no_op_was_built(extensions_dir: Path) -> None:
    built = sorted(path.name for path in extensions_dir.iterdir())
    assert not built, f"DeepSpeed JIT-built {built} in {extensions_dir}: training on CPU needs no compiled op"


def test_zero2_run_trains_only_the_adapter_and_stores_everything(ray_session, s3_storage_uri, tiny_llama_path, tmp_path,
                                                                  torch_extensions_dir):
    result = orchestrator.run(job(s3_storage_uri), run_id="zero2", echo=print)
    assert_no_op_was_built(torch_extensions_dir)
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

    # The same run started again with more steps resumes from its last checkpoint.
    resumed = orchestrator.run(job(s3_storage_uri, train={"max_steps": 18}), run_id="zero2", echo=print)
    assert resumed.summary["resumed_from_step"] == 12 and resumed.summary["steps"] == 18
    steps_seen = [event["step"] for event in resumed.events if event.get("event") == "step"]
    assert steps_seen and steps_seen[0] == 15, "training continued after step 12, not from 0"
    _, run_dir = download_run(resumed, tmp_path / "again")
    history = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history == [3, 6, 9, 12, 15, 18]
    assert_run_manifest_matches_files(run_dir)

    # Starting it once more with nothing left to do changes nothing.
    again = orchestrator.run(job(s3_storage_uri, train={"max_steps": 18}), run_id="zero2", echo=print)
    assert again.summary == resumed.summary


def test_zero3_saves_gathered_adapter(ray_session, s3_storage_uri, tiny_llama_path, tmp_path, torch_extensions_dir):
    # Threshold 0 partitions even tiny parameters, so the save path must really gather them.
    spec = job(s3_storage_uri, deepspeed={"zero_stage": 3, "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}})
    result = orchestrator.run(spec, echo=print)
    assert_no_op_was_built(torch_extensions_dir)
    assert result.summary["base_unchanged"] is True
    _, run_dir = download_run(result, tmp_path)
    assert_adapter_reproduces_trained_logits(tiny_llama_path, run_dir)
    assert_run_manifest_matches_files(run_dir)


def test_gradient_checkpointing_under_zero3_trains_the_same_adapter(ray_session, s3_storage_uri, tiny_llama_path, tmp_path):
    # Recomputing layers in backward changes memory, not math: the same run with and without it, under
    # ZeRO-3 (whose gathered parameters the recompute must see again), ends with the same losses.
    zero3 = {"zero_stage": 3, "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
    short = {"max_steps": 6, "eval_every": 6, "checkpoint_every": 6, "log_every": 3}
    plain = orchestrator.run(job(s3_storage_uri, deepspeed=zero3, train=short), echo=print)
    recomputed = orchestrator.run(job(s3_storage_uri, deepspeed=zero3, train={**short, "gradient_checkpointing": True}), echo=print)
    assert recomputed.summary["base_unchanged"] is True
    for key in ("loss", "eval_loss"):
        assert recomputed.summary["final"][key] == pytest.approx(plain.summary["final"][key], rel=1e-5), key
    _, run_dir = download_run(recomputed, tmp_path)
    assert_adapter_reproduces_trained_logits(tiny_llama_path, run_dir)


def test_resume_skips_a_torn_checkpoint(ray_session, s3_storage_uri, tmp_path):
    first = orchestrator.run(job(s3_storage_uri, train={"max_steps": 12}), run_id="torn", echo=print)
    storage = open_storage(s3_storage_uri)
    layout = RunLayout(storage, "it", "torn")
    # Tear the newest checkpoint: its manifest is gone, as if the upload had died half-way.
    storage.fs.rm_file(f"{layout.checkpoint(12)}/manifest.json")
    assert read_manifest(storage, layout.checkpoint(12)) is None
    resumed = orchestrator.run(job(s3_storage_uri, train={"max_steps": 14}), run_id="torn", echo=print)
    assert first.summary["steps"] == 12
    assert resumed.summary["resumed_from_step"] == 6


def test_resume_refuses_a_changed_adapter(ray_session, s3_storage_uri):
    orchestrator.run(job(s3_storage_uri, train={"max_steps": 6, "checkpoint_every": 6}), run_id="fixed", echo=print)
    with pytest.raises(orchestrator.JobSpecError, match=r"adapter: differs from the spec stored with run fixed"):
        orchestrator.run(job(s3_storage_uri, adapter={"r": 4}, train={"max_steps": 12}), run_id="fixed", echo=print)


def _load_base(model_path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.requires_grad_(False)
    return model
