"""Real DeepSpeed in the test process (one rank, gloo, one process group for the module): every method ×
ZeRO stage 0/2/3 in fp32 and × ZeRO 2/3 in bf16 (ZeRO-3 partitioning the base while it loads) trained by the
project and checked against an independent reference (tests/references.py), and what `deepspeed.initialize`
does to each method's structure."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.adapters import get_method
from orchestrator.adapters.registry import peft_export
from orchestrator.plan import deepspeed_config
from orchestrator.spec import validate_spec
from orchestrator.train.checkpoint import save_adapter
from orchestrator.train.engine import build_engine
from orchestrator.train.model import build_adapted_model
from orchestrator.train.optim import check_rates, expected_rates, make_optimizer
from tests.references import ExplicitDeltaLora, copy_initial_adapter, reference_model, reference_optimizer, train_reference


def job_spec(stage: int, adapter: dict, optim: dict | None = None, config: dict | None = None, precision: str = "fp32"):
    return validate_spec({"name": "t", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"},
                          "adapter": {"target_modules": "all-linear", **adapter}, "optim": optim or {},
                          "train": {"precision": precision},
                          "deepspeed": {"zero_stage": stage, "config": config or {}}, "scaling": {"num_workers": 1}})


def initialized(tiny_llama_path, stage: int, adapter: dict, optim: dict | None = None):
    spec = job_spec(stage, adapter, optim)
    model, _ = build_adapted_model(spec, tiny_llama_path, torch.float32)
    optimizer = make_optimizer(model, spec)
    built = expected_rates(optimizer)
    engine = build_engine(model, optimizer, spec)
    return engine, built


# Dropout off: the reference draws masks differently (LoRA-FA regenerates its mask from a seed); dropout's
# own exactness is tested in tests/test_adapters.py and across resume in the Ray runs.
CELLS = {
    "lora": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {}),
    "rslora": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "rslora": True}, {}),
    "lora+": ({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, {"lora_plus_ratio": 8}),
    "lora_fa": ({"method": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0}, {}),
    "lora_fa_projected": ({"method": "lora_fa", "r": 4, "alpha": 8, "dropout": 0.0, "project_gradient": True}, {}),
    "vera": ({"method": "vera", "r": 32, "d_initial": 0.1}, {"lr": 2e-2}),
    "delta_lora": ({"method": "delta_lora", "r": 4, "alpha": 8, "start_step": 1, "update_ratio": 2.0}, {}),
    "delta_lora+": ({"method": "delta_lora", "r": 4, "alpha": 8, "start_step": 1, "update_ratio": 2.0}, {"lora_plus_ratio": 4}),
}
STEPS = 4


def _batches(vocab: int, steps: int) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(steps + 1):  # the last one is a probe, never trained on
        ids = torch.randint(3, vocab, (4, 12), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def _load_base(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _reference_run(path: str, adapter: dict, optim: dict, initial: dict, batches: list[dict], grad_clip: float,
                   dtype: torch.dtype = torch.float32):
    """Stock PEFT on the base in `dtype` (its adapter in fp32, as PEFT keeps it), plain PyTorch training."""
    model = reference_model(_load_base(path, dtype), adapter)
    copy_initial_adapter(initial, model)
    delta = ExplicitDeltaLora(model, adapter["start_step"], adapter["update_ratio"]) if adapter["method"] == "delta_lora" else None
    losses = train_reference(model, reference_optimizer(model, adapter, optim), [[b] for b in batches[:-1]], grad_clip, delta)
    model.eval()
    with torch.no_grad():
        return losses, model(**batches[-1]).logits.float()


def _ablated(cell: str, adapter: dict, optim: dict) -> tuple[dict, dict] | None:
    """The cell without the rule that sets it apart, to show that the comparison is sharp enough to see it."""
    if cell.endswith("+"):
        return adapter, {**optim, "lora_plus_ratio": None}
    return {"rslora": ({**adapter, "rslora": False}, optim),
            "lora_fa_projected": ({**adapter, "project_gradient": False}, optim),
            "delta_lora": ({**adapter, "update_ratio": 0.0}, optim)}.get(cell)


# Max |Δ| of the trained logits (magnitude ~1.5) against the reference, and relative tolerance of the per-step
# losses, by precision. fp32: measured at most 1.3e-5. bf16: the base and activations are bf16 on both sides,
# but ZeRO-2 computes with a bf16 copy of the adapter (DeepSpeed's fp32 master is in its optimizer) where
# PEFT's reference keeps it fp32, and the two sum in different orders: measured at most ~1e-2 (printed per cell).
LOGITS_TOLERANCE = {"fp32": 2e-4, "bf16": 3e-2}
LOSS_RTOL = {"fp32": 1e-4, "bf16": 1e-2}
# At the fp32 cells' rates (B's up to 8e-2 with LoRA+) four steps amplify bf16's rounding differences chaotically;
# a fifth of the rate keeps the comparison about the method. (The fp32 cells show the comparison is sharp.)
BF16_LR_SCALE = 0.2
STAGES = [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", STAGES, ids=[f"z{stage}-{precision}" for stage, precision in STAGES])
@pytest.mark.parametrize("cell", list(CELLS))
def test_method_matches_its_independent_reference(single_rank_group, tiny_llama_path, tmp_path, cell, stage, precision):
    from peft import PeftModel

    adapter, optim = CELLS[cell]
    optim = {"lr": 1e-2, "scheduler": "constant", **optim}
    optim["lr"] *= BF16_LR_SCALE if precision == "bf16" else 1.0
    # Parameters really partitioned under ZeRO-3, as with any real model; and partitioned while loading.
    spec = job_spec(stage, adapter, optim, {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {},
                    precision=precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    method = get_method(spec.adapter.method)
    torch.manual_seed(0)
    model, _ = build_adapted_model(spec, tiny_llama_path, ds_config=deepspeed_config(spec))
    initial = _initial_adapter(model, spec, stage)
    batches = _batches(model.config.vocab_size, STEPS)

    engine = build_engine(model, make_optimizer(model, spec), spec)
    losses = []
    for step, batch in enumerate(batches[:-1]):
        if method.before_step is not None:
            method.before_step(engine.module, spec.adapter, step, stage == 3)
        loss = engine(**batch).loss
        losses.append(loss.item())
        engine.backward(loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        trained_logits = engine(**batches[-1]).logits.float()
    if precision == "bf16":
        _assert_bf16_base_and_fp32_master(engine.module)
    save_adapter(engine.module, tmp_path / "adapter", zero3=stage == 3, is_writer=True,
                 export=functools.partial(method.export or peft_export, spec=spec.adapter))

    full_adapter = spec.adapter.model_dump()
    reference_losses, reference_logits = _reference_run(tiny_llama_path, full_adapter, optim, initial, batches, spec.optim.grad_clip, dtype)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=LOSS_RTOL[precision], atol=0)
    gap = (trained_logits - reference_logits).abs().max().item()
    print(f"{cell} z{stage} {precision}: logits gap {gap:.3g}")
    assert gap <= LOGITS_TOLERANCE[precision], f"logits differ from the reference by {gap:g}"
    ablated = _ablated(cell, full_adapter, optim)
    if ablated is not None:  # the comparison is sharp enough to see the method's own rule
        other = _reference_run(tiny_llama_path, *ablated, initial, batches, spec.optim.grad_clip, dtype)[1]
        distance = (trained_logits - other).abs().max().item()
        print(f"{cell} z{stage} {precision}: without the rule {distance:.3g}")
        # bf16 at a fifth of the rate: LoRA-FA's projection moves the logits least, ~4× the gap (measured 0.032 vs 0.0078)
        assert distance > (10 if precision == "fp32" else 3) * max(gap, 1e-5), "the comparison cannot see the method's rule"

    # The exported adapter (fp32, as PEFT keeps adapters), loaded by stock PEFT alone on the base in the run's
    # dtype, and merged, reproduces the trained model.
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float32}
    loaded = PeftModel.from_pretrained(_load_base(tiny_llama_path, dtype), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[-1]).logits.float(), trained_logits, rtol=0, atol=LOGITS_TOLERANCE[precision])
        merged = loaded.merge_and_unload()(**batches[-1]).logits.float()
        torch.testing.assert_close(merged, trained_logits, rtol=0, atol=LOGITS_TOLERANCE[precision])


def _initial_adapter(model, spec, stage: int) -> dict[str, torch.Tensor]:
    """The adapter as attached, in fp32 (a bf16 run's reference starts from the same values)."""
    return {name: tensor.float().clone() for name, tensor in peft_export(model, spec.adapter)[0].items()}


def _assert_bf16_base_and_fp32_master(module) -> None:
    """bf16 base weights; every trained parameter has an fp32 master copy in DeepSpeed's optimizer."""
    from deepspeed.utils import safe_get_full_fp32_param

    from orchestrator.train.checkpoint import adapter_parameters

    adapter_ids = {id(p) for p in adapter_parameters(module)}
    assert {p.dtype for p in module.parameters() if id(p) not in adapter_ids} == {torch.bfloat16}
    for parameter in (p for p in adapter_parameters(module) if p.requires_grad):
        master = safe_get_full_fp32_param(parameter) if parameter.dtype != torch.float32 else parameter
        assert master is not None and master.dtype == torch.float32


@pytest.mark.parametrize("stage", [2, 3])
def test_vera_trains_in_bf16_with_shared_projections(single_rank_group, tiny_llama_path, stage):
    """DeepSpeed's bf16 converts parameters, not PEFT's shared projection buffers: the forward must cope."""
    spec = job_spec(stage, {"method": "vera", "r": 64}, {"lr": 1e-2}, precision="bf16")
    model, _ = build_adapted_model(spec, tiny_llama_path)  # DeepSpeed's bf16 casts the whole model, adapter included
    engine = build_engine(model, make_optimizer(model, spec), spec)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    layers = [m for _, m in engine.module.named_modules() if hasattr(m, "vera_lambda_b")]
    assert {m.vera_A["default"].dtype for m in layers} == {torch.bfloat16}
    assert len({m.vera_A["default"].data_ptr() for m in layers}) == 1
    assert len({m.vera_B["default"].data_ptr() for m in layers}) == 1


@pytest.mark.parametrize("stage", [2, 3])
def test_vera_projections_stay_one_storage_after_initialize(single_rank_group, tiny_llama_path, stage):
    engine, _ = initialized(tiny_llama_path, stage, {"method": "vera", "r": 64})
    layers = [m for _, m in engine.module.named_modules() if hasattr(m, "vera_lambda_b")]
    assert len(layers) == 14
    assert len({m.vera_A["default"].data_ptr() for m in layers}) == 1
    assert len({m.vera_B["default"].data_ptr() for m in layers}) == 1


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_plus_rates_survive_initialize(single_rank_group, tiny_llama_path, stage):
    engine, built = initialized(tiny_llama_path, stage, {"method": "lora", "r": 4}, {"lr": 1e-4, "lora_plus_ratio": 16})
    assert [name for name, _ in built] == ["A", "B"]
    check_rates(engine.optimizer, built)
    assert engine.optimizer.param_groups[1]["lr"] == pytest.approx(16 * engine.optimizer.param_groups[0]["lr"])


@pytest.mark.slow
def test_gradient_checkpointing_under_zero3_changes_memory_not_math(single_rank_group, tiny_llama_path):
    """Recomputing layers in backward must see ZeRO-3's gathered parameters again: the same steps give the same
    losses with it as without it, and the layers really run twice (forward, then again in backward)."""
    losses, layer_calls = {}, {}
    for recompute in (False, True):
        raw = job_spec(3, CELLS["lora"][0], {"lr": 1e-2, "scheduler": "constant"},
                       {"zero_optimization": {"stage3_param_persistence_threshold": 0}}).model_dump(mode="json")
        raw["train"]["gradient_checkpointing"] = recompute
        spec = validate_spec(raw)
        torch.manual_seed(0)
        model, _ = build_adapted_model(spec, tiny_llama_path, ds_config=deepspeed_config(spec))
        calls = [0]
        # The layer's first module, on entry: transformers checkpoints a layer's forward (the layer's own hooks run
        # once), and torch's recompute stops as soon as it has what backward needs (a later hook may never run).
        model.get_base_model().model.layers[0].input_layernorm.register_forward_pre_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1))
        engine = build_engine(model, make_optimizer(model, spec), spec)
        engine.train()  # transformers recomputes only in training mode, as the training loop runs
        losses[recompute] = []
        for batch in _batches(model.config.vocab_size, STEPS)[:-1]:
            loss = engine(**batch, use_cache=False).loss
            losses[recompute].append(loss.item())
            engine.backward(loss)
            engine.step()
        layer_calls[recompute] = calls[0]
    assert layer_calls == {False: STEPS, True: 2 * STEPS}, layer_calls
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=0)


def test_deepspeed_starts_without_mlflow_and_leaves_it_importable():
    # A worker's start: DeepSpeed's autotuner would import MLflow (1.4 s on 2 cores) for nothing training uses.
    import subprocess
    import sys

    script = ("import sys\nfrom orchestrator.train.engine import prepare_deepspeed\nprepare_deepspeed(use_gpu=False)\n"
              "import deepspeed\nassert 'mlflow' not in sys.modules\nimport mlflow\nprint(mlflow.__name__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "mlflow", done.stderr[-2000:]


def test_a_cpu_loop_in_a_thread_reuses_freed_activations_without_page_faults():
    # Ray Train runs the loop in a thread: glibc handed that thread's freed heap back to the system after every
    # step and faulted it in again on the next (measured: 3,040 page faults a step here with the old settings).
    import subprocess
    import sys

    script = ("import resource, threading, torch\n"
              "from orchestrator.train.engine import return_freed_tensors_to_the_system\n"
              "return_freed_tensors_to_the_system(zero3=False)\nfaults = []\n"
              "def steps():\n"
              "    for step in range(30):\n"
              "        if step == 10: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)\n"
              "        activations = [torch.ones(256 * 1024) for _ in range(24)]\n"
              "        del activations\n"
              "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)\n"
              "loop = threading.Thread(target=steps)\nloop.start()\nloop.join()\nprint((faults[1] - faults[0]) / 20)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 100, f"{done.stdout.strip()} page faults a step"


# A fresh process (this one has imported anything other tests needed): each ZeRO stage's engine is built and steps
# once, and nothing compiles or imports the compiler of torch's inductor (2.5 s of every worker's start when DeepSpeed's Muon
# module compiled its kernels as ZeRO imported it; train/engine.py).
_NOTHING_COMPILED = """
import os, socket, sys
import torch, torch.distributed as dist
from orchestrator.train.engine import build_engine, prepare_deepspeed
prepare_deepspeed(use_gpu=False)
import deepspeed
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(probe.getsockname()[1]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
deepspeed.init_distributed()
from orchestrator.builtin.models import resolve_model_path
from orchestrator.spec import validate_spec
from orchestrator.train.model import build_adapted_model
from orchestrator.train.optim import make_optimizer
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
for stage in (0, 1, 2, 3):
    spec = validate_spec({"name": "t", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"},
                          "adapter": {"method": "lora", "r": 4, "target_modules": "all-linear"},
                          "deepspeed": {"zero_stage": stage}, "scaling": {"num_workers": 1}})
    model, _ = build_adapted_model(spec, resolve_model_path(spec.model.path), torch.float32)
    engine = build_engine(model, make_optimizer(model, spec), spec)
    engine.backward(engine(input_ids=torch.arange(3, 19)[None], labels=torch.arange(3, 19)[None]).loss)
    engine.step()
    assert not isinstance(engine.optimizer, MuonWithAuxAdam)
print(sorted(m for m in ("torch._inductor.compile_fx", "torch._inductor.lowering") if m in sys.modules))  # inductor's compiler
"""


@pytest.mark.slow
def test_no_zero_stage_imports_torchs_compiler_to_train():
    import subprocess
    import sys

    from tests.helpers import REPO

    done = subprocess.run([sys.executable, "-c", _NOTHING_COMPILED], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
