"""GPU variant (only where CUDA is present): a 1B-class random-init Llama in bf16, LoRA r16 on all
linear layers, one GPU; tokens/s and MFU with LoRA accounting, for the orchestrator and the plain loop; and
the same job under ZeRO-3 (the base partitioned while it loads, bf16 with DeepSpeed's fp32 master copy of the
adapter), its tokens/s against ZeRO-0 and its peak GPU memory (nvidia-smi) beside `plan`'s estimate.

MFU = (4·N_base + 6·N_adapter) · tokens/s ÷ bf16 dense peak: forward 2N plus input gradients 2N through
the frozen base, full forward and backward for the adapter. Attention FLOPs are left out (printed apart).
"""

from __future__ import annotations

# bf16 dense peak, FLOP/s, by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
SHAPE = dict(hidden=2048, layers=16, seq=1024)


def gpu_figures(bench) -> list:
    import torch

    from bench.perf import Figure
    from bench.workload import job_spec

    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device here)", flush=True)
        return []
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)
    workload = bench.workload(**SHAPE)
    spec = job_spec(workload, name="bench-gpu", steps=bench.steps, workers=1, zero_stage=0)
    spec["adapter"].update(r=16, alpha=32)
    spec["scaling"].update(use_gpu=True)
    spec["train"]["precision"] = "bf16"
    plain = bench.baseline("plain", spec, "gpu-plain").steady_tokens_per_s(bench.warmup_steps)
    ours = bench.orchestrator(spec, "gpu").steady_tokens_per_s(bench.warmup_steps)
    base, adapter = workload.base_parameters(), adapter_parameters(workload, 16)
    attention = 3 * 4 * workload.seq * workload.hidden * workload.layers
    print(f"gpu: {name}; attention FLOPs per token (not in MFU): {attention:.3g}; "
          f"base {base:,} / adapter {adapter:,} parameters", flush=True)
    figures = [Figure("gpu_throughput_vs_plain_peft", ours / plain, ">=", 1.0, "ratio", f"{ours:,.0f} vs {plain:,.0f} tok/s")]
    figures.append(_zero3_bf16(bench, spec, ours))
    if peak:
        mfu = (4 * base + 6 * adapter) * ours / peak
        figures.append(Figure("gpu_mfu", mfu, ">=", 0.45, "ratio",
                              f"plain loop {(4 * base + 6 * adapter) * plain / peak:.3f}; peak {peak / 1e12:.0f} TFLOP/s ({name})"))
    return figures


def adapter_parameters(workload, rank: int) -> int:
    hidden, intermediate, kv = workload.hidden, workload.hidden * 8 // 3, workload.hidden
    return workload.layers * rank * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + intermediate))


def _zero3_bf16(bench, spec: dict, zero0_tokens_per_s: float):
    """The same job under ZeRO-3 in bf16; nvidia-smi's peak memory of the GPU's processes while it runs."""
    import copy

    import orchestrator
    from bench.perf import Figure
    from orchestrator.spec import validate_spec

    spec = copy.deepcopy(spec)
    spec["deepspeed"] = {"zero_stage": 3}
    planned = orchestrator.plan(validate_spec(spec)).memory
    peak = _GpuMemoryPeak()
    with peak:
        rate = bench.orchestrator(spec, "gpu-zero3").steady_tokens_per_s(bench.warmup_steps)
    return Figure("gpu_zero3_bf16_vs_zero0_throughput", rate / zero0_tokens_per_s, ">=", 0.7, "ratio",
                  f"{rate:,.0f} vs {zero0_tokens_per_s:,.0f} tok/s; peak GPU memory {peak.mib:,} MiB (CUDA context included), "
                  f"plan {planned.total / 2**20:,.0f} MiB")


class _GpuMemoryPeak:
    """The largest total memory nvidia-smi reports in use on GPU 0 while the block runs, polled each 0.5 s."""

    def __enter__(self):
        import threading

        self.mib, self._running = 0, True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()

    def _poll(self) -> None:
        import subprocess
        import time

        while self._running:
            done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                  capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip():
                self.mib = max(self.mib, int(done.stdout.split()[0]))
            time.sleep(0.5)
