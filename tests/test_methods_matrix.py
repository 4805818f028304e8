"""Adapter methods end to end on 2 Ray workers, real DeepSpeed and S3, each with an injected failure.

The method × ZeRO stage matrix itself runs in-process (tests/test_deepspeed_inprocess.py); these runs
cover what only Ray shows: two ranks averaging gradients, ZeRO's per-rank checkpoint state, a restart
by Ray and an exact resume. Each run trains 6 steps with a checkpoint every 3, and rank 0 fails once:
after step 5 (Ray restarts the workers from step 3; steps 4-5 run twice and must log the same losses),
or after the final step 6, once the final checkpoint is stored (the restarted workers have nothing left
to train and must still publish that checkpoint's adapter). Then: the base is unchanged; the adapter,
loaded by PEFT alone, gives the logits of an independent plain-PyTorch replay (tests/reference_trainer.py)
and not those of the same replay without the method's own rule; the merged export reproduces the run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import orchestrator
from orchestrator.builtin.datasets import resolve_data_path
from orchestrator.train.faults import schedule_fault
from tests.helpers import assert_no_op_was_built, assert_run_manifest_matches_files, download_run, make_spec as job
from tests.reference_trainer import replay

pytestmark = pytest.mark.slow

CELLS = {
    # name: (adapter, optim, ZeRO stage, step after which rank 0 fails)
    "lora+-z2": ({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1}, {"lr": 1e-3, "lora_plus_ratio": 8}, 2, 6),
    "delta_lora+-z3": ({"method": "delta_lora", "r": 8, "alpha": 16, "start_step": 1, "update_ratio": 2.0},
                       {"lr": 1e-3, "lora_plus_ratio": 4}, 3, 5),
    "vera-z0": ({"method": "vera", "r": 64, "d_initial": 0.1}, {"lr": 3e-2}, 0, 5),
    # Seeded dropout: no reference draws the same masks, but the resume must redraw them exactly. In bf16, with
    # the base partitioned while it loads on 2 ranks: the path a real ZeRO-3 job on GPUs takes.
    "lora_fa-z3-bf16": ({"method": "lora_fa", "r": 8, "alpha": 16, "dropout": 0.1, "project_gradient": True}, {"lr": 3e-3}, 3, 5),
}
# Data other than the arithmetic pairs: VeRA's cell trains on chat messages through the tiny tokenizer's template,
# packed, so the restart must replay packed rows exactly and the replay must see no attention across examples.
CELL_DATA = {"vera-z0": {"path": "builtin:chat", "max_length": 160, "packing": True}}


def _uneven_eval_file(tmp_path):
    """9 examples: 5 for rank 0 and 4 for rank 1, so with batch 4 the ranks hold 2 and 1 batches."""
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": f"{2 * i}"}) + "\n" for i in range(9)))
    return str(path)


@pytest.mark.parametrize("cell", list(CELLS))
def test_method_end_to_end_with_a_restart(cell, ray_session, s3_storage_uri, tiny_llama_path, faults_file, tmp_path,
                                          torch_extensions_dir):
    adapter, optim, stage, fail_after = CELLS[cell]
    # Parameters really partitioned under ZeRO-3 (as with any real model): every forward is a collective,
    # so evaluation over an uneven split would hang unless every rank runs the same forwards.
    zero_config = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
    spec = job(
        s3_storage_uri,
        adapter={**adapter, "target_modules": "all-linear"},
        optim={"scheduler": "constant", **optim},
        train={"max_steps": 6, "batch_size": 4, "checkpoint_every": 3, "eval_every": 2 if stage == 3 else 0,
               "log_every": 1, "max_failures": 1, "precision": "bf16" if cell.endswith("-bf16") else "fp32"},
        data={"max_length": 24, **CELL_DATA.get(cell, {}), **({"eval_path": _uneven_eval_file(tmp_path)} if stage == 3 else {})},
        deepspeed={"zero_stage": stage, "config": zero_config},
    )
    run_id = cell.replace("+", "plus")
    schedule_fault(faults_file, run_id, step=fail_after)
    result = orchestrator.run(spec, run_id=run_id, echo=print)

    assert_no_op_was_built(torch_extensions_dir)
    summary = result.summary
    assert summary["status"] == "complete" and summary["base_unchanged"]
    resumed_at = 6 if fail_after == 6 else 3
    assert summary["resumed_from_step"] == resumed_at, "the injected failure must have restarted the workers"
    # The console's one line about the restart (launch/failures.py's WorkerWatch, checkpoint found by the driver).
    restarts = [(e["rank"], e["cause"], e["checkpoint"]) for e in result.events if e.get("event") == "restarting"]
    assert restarts == [(0, f"InjectedFault: injected fault after step {fail_after} of run {run_id}", resumed_at)]
    losses: dict[int, list[float]] = {}
    for event in result.events:
        if event.get("event") == "step":
            losses.setdefault(event["step"], []).append(event)
    for step in range(resumed_at + 1, fail_after + 1):
        first, second = losses[step]
        assert math.isclose(first["loss"], second["loss"], rel_tol=1e-5), f"step {step}: resume is not exact"
        if "eval_loss" in first:
            assert math.isclose(first["eval_loss"], second["eval_loss"], rel_tol=1e-5)
    if stage == 3:
        assert all(not math.isnan(e[0]["eval_loss"]) for s, e in losses.items() if s % 2 == 0)

    _, run_dir = download_run(result, tmp_path)
    assert_run_manifest_matches_files(run_dir)  # a run without its adapter is never complete
    trained = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    if adapter["method"] == "lora_fa":
        initial = _initial_adapter(spec, tiny_llama_path)
        frozen_a = [name for name in trained if ".lora_A." in name]
        assert frozen_a and all(torch.equal(trained[n], initial[n]) for n in frozen_a), "LoRA-FA's A must stay bit-identical"
        assert any(not torch.equal(trained[n], initial[n]) for n in trained if ".lora_B." in n), "nothing trained"
    else:
        _assert_matches_the_reference(cell, spec, tiny_llama_path, run_dir)

    out = orchestrator.export(result.run_uri, tmp_path / "merged", merged=True, echo=print)
    assert (out / "config.json").exists() and not list(out.glob("adapter_*"))


def _initial_adapter(spec, model_path: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    from orchestrator.train.model import build_adapted_model

    torch.manual_seed(spec.train.seed)
    # In the run's precision: PEFT rounds A to the base's dtype before it keeps the adapter in fp32.
    return {k: v.clone() for k, v in get_peft_model_state_dict(build_adapted_model(spec, model_path)[0]).items()}


def _assert_matches_the_reference(cell: str, spec, model_path: str, run_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data_path = resolve_data_path(spec.data.path)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                        str(run_dir / "adapter")).eval()
    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    got, want = logits(trained), logits(replay(spec, model_path, data_path))
    gap = (got - want).abs().max().item()
    print(f"{cell}: logits gap to the independent replay {gap:.3g}")
    assert gap <= 1e-3, f"the run's adapter differs from the independent replay by {gap:g} in the logits"
    ablated = _without_distinctive_rule(cell, spec)
    if ablated is not None:  # the comparison is sharp enough to see the method's own rule
        assert (got - logits(replay(ablated, model_path, data_path))).abs().max().item() > 10 * max(gap, 1e-5)


def _without_distinctive_rule(cell: str, spec):
    """The same spec minus what sets the method apart (LoRA+'s ratio, Delta-LoRA's λ)."""
    if cell.startswith("lora+"):
        return spec.model_copy(update={"optim": spec.optim.model_copy(update={"lora_plus_ratio": None})})
    if cell.startswith("delta_lora"):
        return spec.model_copy(update={"adapter": spec.adapter.model_copy(update={"update_ratio": 0.0})})
    return None
