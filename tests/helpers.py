"""What tests share besides fixtures: the job spec they vary, checks on a stored run, a run folder written
by hand. Fixtures live in conftest.py; test modules import from here, never from one another."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from orchestrator.spec import JobSpec, spec_to_yaml, validate_spec
from orchestrator.storage.fs import open_storage
from orchestrator.storage.layout import RunLayout, checkpoint_dir_name
from orchestrator.storage.manifest import build_manifest, sha256_bytes, write_manifest

REPO = Path(__file__).resolve().parent.parent
TEST_BUCKET = "orchestrator-test"

# Only what a spec requires; every other section takes its defaults.
MINIMAL_SPEC = {"name": "t", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"}}

# A run small enough for CPUs: tiny model, LoRA on every linear layer, 12 steps, 2 workers, ZeRO-2.
TRAINING_JOB = {
    "name": "it",
    "model": {"path": "builtin:tiny-llama"},
    "data": {"path": "builtin:arithmetic", "max_length": 32},
    "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    "optim": {"lr": 3e-3, "scheduler": "constant"},
    "train": {"max_steps": 12, "batch_size": 8, "eval_every": 6, "checkpoint_every": 6, "log_every": 3, "eval_batches": 2},
    "deepspeed": {"zero_stage": 2},
    "scaling": {"num_workers": 2},
}


def make_spec(storage_uri: str | None = None, *, base: dict = TRAINING_JOB, raw: bool = False,
              **overrides: Any) -> JobSpec | dict:
    """`base` (the training job unless told) stored at `storage_uri`, with `overrides`: a validated JobSpec,
    or with raw=True the dict to validate (or to write as a job file).

    A section's fields are merged into the base's section, except that another adapter method replaces
    the adapter section (its fields are its own); any other value replaces the key, and None removes it:
    make_spec(uri, adapter={"r": 4}, train={"max_steps": 6}), make_spec(base=MINIMAL_SPEC, model=None).
    """
    spec = dict(base)
    if storage_uri is not None:
        spec["storage"] = {**spec.get("storage", {}), "uri": storage_uri}
    for key, value in overrides.items():
        section = spec.get(key)
        if value is None:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(section, dict) and not _other_method(key, section, value):
            spec[key] = {**section, **value}
        else:
            spec[key] = value
    spec = copy.deepcopy(spec)  # neither the base nor the caller's dicts are shared with the result
    return spec if raw else validate_spec(spec)


def _other_method(key: str, section: dict, fields: dict) -> bool:
    method = section.get("method", "lora")
    return key == "adapter" and fields.get("method", method) != method


def download_run(result, tmp_path: Path) -> tuple[RunLayout, Path]:
    """A finished run's folder (result.run_uri), copied to tmp_path/run."""
    storage = open_storage(result.run_uri.split("/runs/")[0])
    job_name, run_id = result.run_uri.split("/runs/")[1].split("/")
    layout = RunLayout(storage, job_name, run_id)
    local = tmp_path / "run"
    storage.download_dir(layout.run_dir, local)
    return layout, local


def assert_adapter_reproduces_trained_logits(model_path: str, run_dir: Path) -> None:
    import torch
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


def training_metrics(max_steps: int, eval_every: int, start_loss: float, log_every: int = 3) -> list[dict]:
    """What the worker loop logs: loss every log_every steps, eval_loss at evaluations (and the last step)."""
    entries = []
    for step in range(log_every, max_steps + 1, log_every):
        entry = {"loss": start_loss - 0.05 * step, "tokens_per_s": 4000.0 + step, "tokens": 400 * step,
                 "step": step, "epoch": 0, "lr": 3e-3}
        if step % eval_every == 0 or step == max_steps:
            entry["eval_loss"] = start_loss + 0.1 - 0.04 * step
        entries.append(entry)
    return entries


def write_run(storage, path: str, spec, metrics: list[dict], *, complete: bool = True, checkpoints=(6,),
              params: dict | None = None) -> int:
    """A run folder as the worker loop leaves it; returns the bytes written (what `runs` must report as its size)."""
    files = {"spec.yaml": spec_to_yaml(spec).encode(), "metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics).encode()}
    if params is not None:
        files["params.json"] = json.dumps(params).encode()
    adapter = {"adapter/adapter_config.json": b'{"r": 8, "peft_type": "LORA"}', "adapter/adapter_model.safetensors": b"\0" * 512}
    written = 0
    for step in checkpoints:
        folder = f"{path}/checkpoints/{checkpoint_dir_name(step)}"
        for name, data in adapter.items():
            storage.write_bytes(storage.path(folder, name), data)
            written += len(data)
        write_manifest(storage, storage.path(folder), build_manifest({n: sha256_bytes(d) for n, d in adapter.items()}, step=step))
        written += len(storage.read_bytes(storage.path(folder, "manifest.json")))
    if complete:
        summary = {"status": "complete", "steps": spec.train.max_steps, "trainable_parameters": 65536, "total_parameters": 427648,
                   "trainable_percent": 15.325, "final": metrics[-1], "wall_seconds": 83.4}
        files |= adapter | {"summary.json": json.dumps(summary).encode(), "probe_logits.safetensors": b"\1" * 64}
    for name, data in files.items():
        storage.write_bytes(storage.path(path, name), data)
        written += len(data)
    if complete:
        write_manifest(storage, storage.path(path), build_manifest({n: sha256_bytes(d) for n, d in files.items()}, status="complete"))
        written += len(storage.read_bytes(storage.path(path, "manifest.json")))
    return written


def assert_worker_failure_is_three_lines(result, cause: str, rank: int, checkpoint: int, ray_tmp: Path) -> None:
    """A local `orchestrator run` whose worker failed for good (a subprocess `result`): the failure is three
    lines on stderr (the root cause; rank, host and run; the full log, a file of this Ray session that holds
    the traceback) and the only place the console names it; no traceback or forwarded Ray output anywhere."""
    import re
    import socket

    console = result.stdout + result.stderr
    for noise in ("Traceback", "Error Snippet", "(RayTrainWorker", "(TrainController", "(raylet)"):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    failure = result.stderr[result.stderr.index("error: "):].splitlines()
    assert failure[0] == f"error: training failed: {cause}" and len(failure) == 3, failure
    assert console.count(cause.split(": ", 1)[1]) == 1, "the cause is told once"
    assert re.fullmatch(rf"  on worker rank {rank}, host {re.escape(socket.gethostname())} \(pid \d+\); run \S+ "
                        rf"\(last complete checkpoint: step {checkpoint}\)", failure[1]), failure[1]
    log = Path(failure[2].removeprefix("  full log: "))
    assert log.is_file() and log.is_relative_to(ray_tmp), failure[2]
    assert "Traceback" in log.read_text() and cause.split(": ", 1)[1] in log.read_text()
