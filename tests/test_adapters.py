"""The methods' math, without Ray or DeepSpeed: closed-form counts, identity at init, Delta-LoRA equal
to the explicit algorithm, LoRA-FA's lean dropout and projection, VeRA's shared projections, exports."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model_state_dict

from orchestrator.adapters import all_methods, get_method
from orchestrator.adapters.lora import lora_layers
from orchestrator.adapters._seeded_dropout import SeededDropout
from orchestrator.adapters.lora_fa import projection
from orchestrator.plan import build_plan
from tests.helpers import MINIMAL_SPEC, make_spec
from tests.references import ExplicitDeltaLora, copy_initial_adapter, reference_model

METHOD_OPTIONS = {
    "lora": {"r": 4},
    "lora_fa": {"r": 4},
    "vera": {"r": 32},
    "delta_lora": {"r": 4, "start_step": 0},
}


def tiny_fp64_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    model = LlamaForCausalLM(config).double()
    model.requires_grad_(False)
    return model


def adapted(method: str, seed: int = 1, **options):
    spec = get_method(method).spec(**{**METHOD_OPTIONS[method], "target_modules": ["q_proj", "v_proj", "down_proj"], **options})
    base = tiny_fp64_model()
    torch.manual_seed(seed)
    return base, get_method(method).attach(copy.deepcopy(base), spec), spec


def test_every_method_is_registered_with_a_tagged_spec():
    assert {m.name for m in all_methods()} == {"lora", "lora_fa", "vera", "delta_lora"}
    for method in all_methods():
        assert method.spec().method == method.name


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_closed_form_count_matches_the_attached_model(tiny_llama_path, method, targets):
    from transformers import AutoConfig

    from orchestrator.train.model import build_adapted_model

    spec = make_spec(base=MINIMAL_SPEC, adapter={"method": method, **METHOD_OPTIONS[method], "target_modules": targets},
                     train={"max_steps": 10})
    plan = build_plan(spec, AutoConfig.from_pretrained(tiny_llama_path))
    _, counts = build_adapted_model(spec, tiny_llama_path, torch.float32)
    assert plan.trainable_parameters == counts.trainable
    shapes = plan.adapted_layers.values()
    closed_form = {
        "lora": sum(4 * (i + o) for i, o in shapes), "delta_lora": sum(4 * (i + o) for i, o in shapes),
        "lora_fa": sum(4 * o for _, o in shapes), "vera": sum(o + 32 for _, o in shapes),
    }[method]
    assert counts.trainable == closed_form


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_output_equals_the_base_at_init(method):
    base, model, spec = adapted(method)
    model.train()
    if spec.method == "delta_lora":
        get_method(method).before_step(model, spec, 0, False)
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def _train_steps(model, steps: int, lr: float = 1e-2, before_step=None, after_step=None):
    """AdamW on the trainable parameters; returns logits per step. Batches depend only on the step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    outputs = []
    for step in range(steps):
        if before_step:
            before_step(step)
        generator = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(0, 40, (2, 8), generator=generator)
        logits = model(input_ids=ids).logits
        outputs.append(logits.detach().clone())
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step:
            after_step(step)
    return outputs


@pytest.mark.parametrize("start_step, ratio", [(2, 2.0), (0, 0.5)])
def test_delta_lora_equals_the_papers_explicit_weight_update(start_step, ratio, tmp_path):
    """Ours (W0 untouched, stop-gradient term) vs Algorithm 1 written out on stock PEFT LoRA, fp64: after the
    optimizer step of iteration t > K, W ← W + λ·s·(B'A' − BA). Logits after every step, then through export
    (rank-2r LoRA loaded by PEFT alone) and merge."""
    from peft import PeftModel

    from orchestrator.train.checkpoint import save_adapter

    _, ours, spec = adapted("delta_lora", start_step=start_step, update_ratio=ratio)
    explicit = reference_model(tiny_fp64_model(), {"method": "delta_lora", "r": spec.r, "alpha": spec.alpha,
                                                   "target_modules": spec.target_modules})
    copy_initial_adapter(get_peft_model_state_dict(ours), explicit)
    algorithm = ExplicitDeltaLora(explicit, start_step, ratio)
    ours_out = _train_steps(ours, 6, before_step=lambda step: get_method("delta_lora").before_step(ours, spec, step, False))
    explicit_out = _train_steps(explicit, 6, before_step=lambda step: algorithm.before_optimizer_step(),
                                after_step=algorithm.after_optimizer_step)
    for step, (a, b) in enumerate(zip(ours_out, explicit_out)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"step {step}")
    assert not torch.equal(ours_out[-1], _train_steps(adapted("lora", dropout=0.0)[1], 6)[-1]), "λ>0 must differ from LoRA"
    # W0 itself was never written
    fresh = tiny_fp64_model()
    for (name, layer) in lora_layers(ours):
        original = fresh.get_submodule(name.removeprefix("base_model.model.")).weight
        assert torch.equal(layer.base_layer.weight, original)
    # The trained models after the last step, and the export of ours, agree.
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(5))
    get_method("delta_lora").before_step(ours, spec, 6, False)
    save_adapter(ours, tmp_path, zero3=False, is_writer=True, export=lambda model: get_method("delta_lora").export(model, spec))
    loaded = PeftModel.from_pretrained(tiny_fp64_model(), str(tmp_path))
    ours.eval(), explicit.eval(), loaded.eval()
    with torch.no_grad():
        want = explicit(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(loaded.merge_and_unload()(input_ids=ids).logits, want, rtol=0, atol=1e-10)


def test_delta_lora_with_zero_ratio_is_lora():
    _, ours, spec = adapted("delta_lora", start_step=0, update_ratio=0.0)
    _, lora, _ = adapted("lora", dropout=0.0)
    ours_out = _train_steps(ours, 4, before_step=lambda step: get_method("delta_lora").before_step(ours, spec, step, False))
    for a, b in zip(ours_out, _train_steps(lora, 4)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_delta_lora_exports_as_an_equivalent_rank_2r_lora(tmp_path):
    from peft import PeftModel

    from orchestrator.train.checkpoint import save_adapter

    _, ours, spec = adapted("delta_lora", start_step=1, update_ratio=2.0)
    _train_steps(ours, 4, before_step=lambda step: get_method("delta_lora").before_step(ours, spec, step, False))
    save_adapter(ours, tmp_path, zero3=False, is_writer=True,
                 export=lambda model: get_method("delta_lora").export(model, spec))
    loaded = PeftModel.from_pretrained(tiny_fp64_model(), str(tmp_path))
    assert loaded.peft_config["default"].r == 2 * spec.r
    ids = torch.randint(0, 40, (2, 8))
    ours.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-10)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-10)


def test_lora_fa_keeps_a_frozen_and_trains_b():
    _, model, _ = adapted("lora_fa", dropout=0.1)
    a_before = {name: layer.lora_A["default"].weight.clone() for name, layer in lora_layers(model)}
    _train_steps(model, 3)
    for name, layer in lora_layers(model):
        assert torch.equal(layer.lora_A["default"].weight, a_before[name])
        assert not layer.lora_A["default"].weight.requires_grad
        assert layer.lora_B["default"].weight.abs().sum() > 0


def test_seeded_dropout_regenerates_the_mask_it_used():
    torch.manual_seed(0)
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    dropout = SeededDropout(0.3)
    y = dropout(x)
    y.backward(torch.ones_like(y))
    kept = y.detach() != 0
    # forward: kept units scaled by 1/(1-p); backward: the same units, the same scale
    torch.testing.assert_close(y.detach()[kept], x.detach()[kept] / 0.7)
    assert torch.equal(x.grad != 0, kept)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert 0.5 < kept.double().mean() < 0.9
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_lora_fa_projection_multiplies_b_gradient():
    _, plain, _ = adapted("lora_fa", dropout=0.0)
    _, projected, _ = adapted("lora_fa", dropout=0.0, project_gradient=True)
    ids = torch.randint(0, 40, (2, 8))
    for model in (plain, projected):
        model(input_ids=ids, labels=ids).loss.backward()
    for (_, raw), (_, proj) in zip(lora_layers(plain), lora_layers(projected)):
        a = raw.lora_A["default"].weight
        expected = raw.lora_B["default"].weight.grad @ torch.linalg.inv(a @ a.T) / raw.scaling["default"] ** 2
        torch.testing.assert_close(proj.lora_B["default"].weight.grad, expected, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(projection(a, 2.0), torch.linalg.inv(a @ a.T) / 4, rtol=1e-5, atol=1e-10)


def test_vera_projections_are_one_storage_shared_by_every_layer():
    _, model, _ = adapted("vera")
    layers = [m for _, m in model.named_modules() if hasattr(m, "vera_A") and hasattr(m, "vera_lambda_b")]
    assert len(layers) == 3
    assert len({layer.vera_A["default"].data_ptr() for layer in layers}) == 1
    assert len({layer.vera_B["default"].data_ptr() for layer in layers}) == 1
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(".vera_lambda_b." in n or ".vera_lambda_d." in n for n in trainable)


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_gradient_checkpointing_recomputes_every_layer_and_keeps_the_gradients(tiny_llama_path, method):
    from orchestrator.train.model import build_adapted_model

    # Dropout where the method allows it: the recompute must draw the same mask.
    options = {**METHOD_OPTIONS[method], **({"dropout": 0.1} if method in ("lora", "lora_fa") else {})}
    grads, layer_calls = {}, {}
    for recompute in (False, True):
        spec = make_spec(base=MINIMAL_SPEC, adapter={"method": method, **options, "target_modules": "all-linear"},
                         train={"max_steps": 10, "gradient_checkpointing": recompute})
        torch.manual_seed(0)
        model, _ = build_adapted_model(spec, tiny_llama_path, torch.float64)
        model.train()
        for name, parameter in model.named_parameters():  # B starts at zero, which would hide A's gradient
            if parameter.requires_grad:
                parameter.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        layers = model.get_base_model().model.layers
        calls = []
        # transformers checkpoints the layer's forward, so only hooks inside it see the recompute; a pre-hook,
        # because the recompute stops once the last saved tensor is rebuilt, before later modules finish.
        for layer in layers:
            layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[recompute] = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        layer_calls[recompute] = len(calls)
    assert layer_calls == {False: len(layers), True: 2 * len(layers)}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_starts_with_b_zero_and_the_papers_scale(rslora):
    _, model, spec = adapted("lora", r=4, alpha=16, rslora=rslora)
    layers = lora_layers(model)
    assert len(layers) == 3
    for _, layer in layers:
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) == layer.lora_A["default"].weight.numel()
        assert layer.scaling["default"] == pytest.approx(16 / 2 if rslora else 16 / 4)  # α/√r or α/r


def test_vera_starts_with_b_zero_and_d_at_d_initial():
    _, model, _ = adapted("vera", r=32, d_initial=0.25)
    layers = [m for m in model.modules() if hasattr(m, "vera_lambda_b")]
    assert len(layers) == 3
    for layer in layers:
        assert torch.count_nonzero(layer.vera_lambda_b["default"]) == 0
        torch.testing.assert_close(layer.vera_lambda_d["default"], torch.full((32,), 0.25, dtype=torch.float64))


def test_lora_fa_projected_step_equals_peft_lorafa_optimizer():
    """One AdamW step of ours (A frozen, B's gradient projected by a hook) vs PEFT's create_lorafa_optimizer, fp64.

    PEFT's optimizer is HF-style Adam: its eps sits inside the bias correction, so on step 1 it acts as
    eps/√(1−β2); it is given 1e-8·√(1−β2) to equal torch AdamW's 1e-8. It computes the projection under bf16
    autocast when the machine has bf16: turned off, to compare exact math.
    """
    import peft.optimizers.lorafa as lorafa
    from peft.optimizers import create_lorafa_optimizer

    from orchestrator.train.optim import make_optimizer

    _, ours, spec = adapted("lora_fa", r=4, alpha=8, dropout=0.0, project_gradient=True)
    _, unprojected, _ = adapted("lora_fa", r=4, alpha=8, dropout=0.0)  # to show that the comparison sees the projection
    theirs = reference_model(tiny_fp64_model(), {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                                 "target_modules": spec.target_modules})
    copy_initial_adapter(get_peft_model_state_dict(ours), theirs)
    for model in (ours, unprojected, theirs):  # B = 0 would make A's role invisible in one step
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    job = make_spec(base=MINIMAL_SPEC, adapter={"method": "lora_fa", "r": 4, "alpha": 8}, optim={"lr": 1e-2})
    original_bf16_check = lorafa.is_bf16_available
    lorafa.is_bf16_available = lambda: False
    try:
        theirs_optimizer = create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2)
        for group in theirs_optimizer.param_groups:
            group["eps"] = 1e-8 * (1 - group["betas"][1]) ** 0.5
        ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(3))
        for model, optimizer in ((ours, make_optimizer(ours, job)), (unprojected, make_optimizer(unprojected, job)),
                                 (theirs, theirs_optimizer)):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    finally:
        lorafa.is_bf16_available = original_bf16_check
    ours_state, theirs_state = get_peft_model_state_dict(ours), get_peft_model_state_dict(theirs)
    assert ours_state.keys() == theirs_state.keys()
    for name in ours_state:
        torch.testing.assert_close(ours_state[name], theirs_state[name], rtol=0, atol=1e-12, msg=name)
    unprojected_state = get_peft_model_state_dict(unprojected)
    assert max((unprojected_state[n] - ours_state[n]).abs().max().item() for n in ours_state) > 1e-3


@pytest.mark.parametrize("method", ["delta_lora", "lora_fa"])
def test_linear_only_methods_refuse_an_embedding_in_one_line_from_plan(method):
    """PEFT starts an embedding's A at zero (B random): LoRA-FA would freeze the wrong factor, and
    Delta-LoRA's W update is defined for linear layers."""
    from transformers import AutoConfig

    from orchestrator.builtin.models import resolve_model_path
    from orchestrator.errors import PreflightError

    spec = make_spec(base=MINIMAL_SPEC, adapter={"method": method, **METHOD_OPTIONS[method],
                                                 "target_modules": ["q_proj", "embed_tokens"]})
    with pytest.raises(PreflightError, match=rf"{method} adapts linear layers only, and model.embed_tokens is not one"):
        build_plan(spec, AutoConfig.from_pretrained(resolve_model_path("builtin:tiny-llama")))
