"""Adapter methods side by side, in one process: trainable parameters, saved-activation bytes per
training step, and step time, each as a ratio to LoRA.

Saved activations are what autograd keeps for backward, captured with saved_tensors_hooks and
deduplicated by storage; parameters and buffers are not activations and are left out.

    python bench/methods.py [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from orchestrator.adapters import get_method

# The shape the issue fixes: Llama-like, hidden 256, 4 layers, seq 128, batch 4, r 16, all linear, dropout 0.05.
HIDDEN, LAYERS, SEQ, BATCH, RANK, DROPOUT, VOCAB = 256, 4, 128, 4, 16, 0.05, 512

METHODS = {
    "lora": ("lora", {"r": RANK, "alpha": 2 * RANK, "dropout": DROPOUT}),
    "lora (A frozen, PEFT layers)": ("lora", {"r": RANK, "alpha": 2 * RANK, "dropout": DROPOUT}),
    "lora_fa": ("lora_fa", {"r": RANK, "alpha": 2 * RANK, "dropout": DROPOUT}),
    "vera (r 256)": ("vera", {"r": 256, "dropout": DROPOUT}),
    "delta_lora": ("delta_lora", {"r": RANK, "alpha": 2 * RANK, "start_step": 0}),
}


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=688, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model


def build(label: str, base):
    name, options = METHODS[label]
    method = get_method(name)
    spec = method.spec(target_modules="all-linear", **options)
    torch.manual_seed(1)
    model = method.attach(copy.deepcopy(base), spec)
    if label.startswith("lora (A frozen"):
        for _, p in model.named_parameters():
            if ".lora_A." in _:
                p.requires_grad_(False)
    if method.before_step:
        method.before_step(model, spec, 0, False)
    model.train()
    return model


def saved_activation_bytes(model, batch) -> int:
    static = {p.untyped_storage().data_ptr() for p in model.parameters()}
    static |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in static:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def trainable_at_7b_scale() -> dict[str, tuple[int, float]]:
    """`plan`'s counts (PEFT attached on the meta device: no memory) on a Llama-2-7B-shaped config, and
    the percentage `plan` prints (trainable ÷ (base + trainable))."""
    from transformers import LlamaConfig

    from orchestrator.plan import estimate_adapter
    from orchestrator.spec import validate_spec

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    counts = {}
    for label, (name, options) in METHODS.items():
        if label.startswith("lora (A frozen"):
            name = "lora_fa"  # the same trainable set: B only
        spec = validate_spec({"name": "bench", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"},
                              "adapter": {"method": name, "target_modules": "all-linear", **options}})
        estimate = estimate_adapter(spec, config)
        count = estimate.trainable_parameters
        counts[label] = (count, 100 * count / (estimate.base_parameters + count))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per method (interleaved)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = base_model()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    models = {label: build(label, base) for label in METHODS}
    optimizers = {label: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for label, m in models.items()}
    rows = {}
    for label, model in models.items():
        rows[label] = {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "saved_bytes": saved_activation_bytes(model, batch),
        }
    # Interleave the methods step by step so that machine noise hits them all alike.
    times: dict[str, list[float]] = {label: [] for label in models}
    for step in range(args.steps + 2):
        for label, model in models.items():
            started = time.perf_counter()
            model(**batch).loss.backward()
            optimizers[label].step()
            optimizers[label].zero_grad(set_to_none=True)
            if step >= 2:  # warm-up steps are not timed
                times[label].append(time.perf_counter() - started)
    base_total = sum(p.numel() for p in base.parameters())
    lora = rows["lora"]
    lora_time = statistics.median(times["lora"])
    print(f"Llama-shaped: hidden {HIDDEN}, {LAYERS} layers, seq {SEQ}, batch {BATCH}, all linear layers, "
          f"dropout {DROPOUT}; base {base_total:,} parameters; {args.steps} timed steps each (median)")
    print(f"{'method':<30} {'trainable':>10} {'% of base':>9} {'× LoRA':>7} {'saved MiB':>9} {'× LoRA':>7} {'step × LoRA':>11}")
    for label, row in rows.items():
        row["trainable_vs_lora"] = row["trainable"] / lora["trainable"]
        row["saved_vs_lora"] = row["saved_bytes"] / lora["saved_bytes"]
        row["step_time_vs_lora"] = statistics.median(times[label]) / lora_time
        print(f"{label:<30} {row['trainable']:>10,} {100 * row['trainable'] / base_total:>8.3f}% {row['trainable_vs_lora']:>7.3f} "
              f"{row['saved_bytes'] / 2**20:>9.2f} {row['saved_vs_lora']:>7.3f} {row['step_time_vs_lora']:>11.2f}")
    print("\nTrainable parameters on a Llama-2-7B-shaped model (all linear layers, same options):")
    at_scale = trainable_at_7b_scale()
    for label, (count, percent) in at_scale.items():
        rows[label]["trainable_7b"], rows[label]["trainable_7b_percent"] = count, percent
        print(f"{label:<30} {count:>12,} {percent:>8.3f}% {count / at_scale['lora'][0]:>7.3f} × LoRA")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
