"""`orchestrator export`: a finished run's (or search trial's) adapter in PEFT format, or the base with it merged in.

Everything is downloaded and checked against the run manifest first, the result is checked against
the logits the trained model produced (probe_logits.safetensors), and it is written to a staging
directory that is renamed into place only when complete: a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.results.uri import is_search, served_storage, split_result_uri
from orchestrator.spec import validate_spec
from orchestrator.storage.layout import RunLayout, result_layout
from orchestrator.storage.manifest import hash_local_dir, read_manifest

# Max |Δ logit| the export check allows, by the run's precision. The base is loaded in the run's dtype and
# the adapter in fp32 (as it is stored). fp32 runs reproduce the trained logits to rounding; in bf16, ZeRO-2
# trained with a bf16 copy of the adapter (the export holds DeepSpeed's fp32 master) and a merged model rounds
# W0 + ΔW to bf16: measured up to 1.6e-2 on logits of magnitude ~1.5 (tests/test_deepspeed_inprocess.py).
_PROBE_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def export(run_uri: str, out: str | Path, merged: bool = False, endpoint_url: str | None = None, echo=print, *,
           storage_uri: str | None = None) -> Path:
    """`run_uri`: …/runs/<job>/<run-id> or a search trial, …/tune/<search>/trials/<trial-id> (or either path
    relative to `storage_uri`, default local mode's store, as `orchestrator runs` and `show` print it)."""
    storage_uri, path = split_result_uri(run_uri, storage_uri)
    if is_search(path):
        raise OrchestratorError(f"{run_uri}: a search, not a run; export one of its trials (…/{path}/trials/<trial-id>, "
                                f"`orchestrator show {storage_uri}/{path}` lists them) or copy its best/adapter, already in PEFT format")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OrchestratorError(f"--out {out}: already exists and is not an empty directory")
    with (served_storage(storage_uri, endpoint_url, echo, check=False) as storage,
          tempfile.TemporaryDirectory(prefix="orchestrator-export-") as scratch):
        run_dir = _download_verified(result_layout(storage, path), Path(scratch) / "run")
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent.resolve() if out.parent.exists() else None))
        try:
            if merged:
                _write_merged(run_dir, staging, echo)
            else:
                shutil.copytree(run_dir / "adapter", staging, dirs_exist_ok=True)
            if out.exists():
                out.rmdir()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging), str(out))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    echo(f"exported {'merged model' if merged else 'adapter'} of {run_uri} to {out}")
    return out


def _download_verified(layout: RunLayout, local: Path) -> Path:
    manifest = read_manifest(layout.storage, layout.run_dir)
    if manifest is None or manifest.get("status") != "complete":
        unfinished = ("a trial the search stopped early or that failed has none; its checkpoints/ hold adapters" if layout.root == "tune"
                      else "resume or finish the run first")
        raise OrchestratorError(f"{layout.uri}: no complete run there (its manifest.json is missing); {unfinished}")
    wanted = ("adapter", "spec.yaml", "probe_logits.safetensors")
    layout.storage.download_dir(layout.file("adapter"), local / "adapter")
    for name in wanted[1:]:
        (local / name).write_bytes(layout.storage.read_bytes(layout.file(name)))
    actual = hash_local_dir(local)
    expected = {name: digest for name, digest in manifest["files"].items() if name.split("/")[0] in wanted}
    damaged = sorted(name for name, digest in expected.items() if actual.get(name) != digest)
    if damaged or not expected:
        raise OrchestratorError(f"{layout.uri}: files differ from the run manifest: {damaged[:3]}")
    return local


def _write_merged(run_dir: Path, out: Path, echo) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from orchestrator.builtin.models import resolve_model_path
    from orchestrator.train.model import load_tokenizer

    from orchestrator.plan import precision
    from orchestrator.train.model import run_dtype

    spec = validate_spec(yaml.safe_load((run_dir / "spec.yaml").read_text()), source="spec.yaml")
    model_path = resolve_model_path(spec.model.path)
    tolerance = _PROBE_TOLERANCE[precision(spec)]
    # The base in the run's dtype (a bf16 run's merged model is a bf16 model), the adapter as stored.
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=run_dtype(spec), trust_remote_code=spec.model.trust_remote_code)
    adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    probe = load_file(run_dir / "probe_logits.safetensors")
    with torch.no_grad():
        adapted_logits = adapted(input_ids=probe["input_ids"][None]).logits[0, -4:]
        _check_close(adapted_logits, probe["logits"], tolerance, "the adapter no longer reproduces the trained model")
        merged = adapted.merge_and_unload()
        _check_close(merged(input_ids=probe["input_ids"][None]).logits[0, -4:], adapted_logits, tolerance, "merging changed the model's logits")
    merged.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(model_path, spec.model.trust_remote_code).save_pretrained(str(out))
    echo(f"merged model checked against the trained model's logits (max |Δ| ≤ {tolerance:g}, {precision(spec)})")


def _check_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, problem: str) -> None:
    difference = (actual.float() - expected.float()).abs().max().item()
    if difference > tolerance:
        raise OrchestratorError(f"export refused: {problem} (max |Δ logit| {difference:.2e} > {tolerance:g})")
