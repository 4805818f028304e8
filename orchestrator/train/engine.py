"""DeepSpeed in a worker process: its set-up on CPU, and the one call that wraps the model in its engine."""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from orchestrator.plan import deepspeed_config
from orchestrator.spec import JobSpec

# DeepSpeed's CPU backend JIT-compiles this shared-memory op when it sets up communication: about
# 25 s on 2 cores on a machine's first run, and a C++ compiler on every CPU node. Only its inference
# all-reduce (AutoTP) calls the op; training's collectives all go through torch.distributed (gloo).
_INFERENCE_ONLY_CPU_OPS = ("deepspeed_shm_comm",)


def prepare_deepspeed(use_gpu: bool) -> None:
    """Call before DeepSpeed's first use in the process. On CPU: its CPU accelerator (which skips the
    GPU probe and its warning), without building ops that training never calls."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with _hidden(_MLFLOW):
        import deepspeed.ops
    _import_muon_uncompiled()
    if use_gpu:
        return
    # DeepSpeed consults this dict before building an op, and keeps edits to it for the process.
    for op_name in _INFERENCE_ONLY_CPU_OPS:
        deepspeed.ops.__compatible_ops__[op_name] = False


# DeepSpeed's autotuner imports MLflow wherever it is installed (1.4 s of each worker's start on 2 cores), to log
# autotuning, which training never runs; a run's MLflow logging is the driver's.
_MLFLOW = "mlflow"
# DeepSpeed's Muon optimizer, which its ZeRO code imports to check the optimizer against it (at initialize, then
# in every ZeRO-2 gradient reduction). The module wraps its kernels in torch.compile as it is imported, and that
# imports torch's inductor: 2.5 s of a 2.6 s `deepspeed.initialize` on the tiny model, in every worker of every run.
_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextmanager
def _hidden(module: str) -> Iterator[None]:
    """`import module` raises ImportError while inside (unless it was imported already); restored after, so that
    anything later imports it as usual."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # how Python marks a module that is not there: ImportError on import
    try:
        yield
    finally:
        if module in sys.modules and sys.modules[module] is None:
            del sys.modules[module]


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon module with its kernels left as plain functions. The module and its classes are
    DeepSpeed's own (so its `isinstance` checks hold); only the compilation of kernels that the project's
    optimizer (torch's AdamW, train/optim.py) never calls is skipped."""
    if _MUON in sys.modules:
        return
    import torch

    compile_ = torch.compile
    torch.compile = _not_compiled
    try:
        importlib.import_module(_MUON)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        torch.compile = compile_


def _not_compiled(model=None, **_options):
    """torch.compile's two forms (`@torch.compile`, `@torch.compile(...)`), compiling nothing."""
    return model if model is not None else (lambda function: function)


def build_engine(model, optimizer, spec: JobSpec, lr_scheduler=None, ds_config: dict[str, Any] | None = None):
    """`deepspeed.initialize` with the plan's DeepSpeed config (`ds_config`, as the driver built it for
    the workers); without one, the spec's, built here (in-process callers, tests, benchmarks)."""
    prepare_deepspeed(spec.scaling.use_gpu)  # before DeepSpeed's import in a process that has not set it up
    import deepspeed

    if ds_config is None:
        ds_config = deepspeed_config(spec)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config)
    return engine


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def return_freed_tensors_to_the_system(zero3: bool) -> None:
    """On CPU, tensors live in glibc's heaps. By default glibc serves every allocation below a threshold that
    grows up to 32 MB from heaps it rarely shrinks, and the activations and ZeRO-3's gathered weights, allocated
    and freed every step (also from the communication threads), pile up there: a 2-worker ZeRO-3 run of a 300M
    model grew to 4× the model's bytes per worker, and a ZeRO-2 run at 16 × 512 tokens held 2.7× what its
    activations need. Fixed, the threshold maps every larger tensor on its own and unmaps it when freed; each
    such tensor is then mapped and zeroed afresh, which costs time on small ones (at 1 MB the throughput bench's
    steps took twice as long). So: 32 KB under ZeRO-3, whose gathered weights are the model and whose adapter
    gradients (a few to a hundred KB each, every step) otherwise fragment the loop thread's heap (the 300M
    memory bench's worker peaked 27 MB lower than with 128 KB; 16 and 8 KB gained nothing more); 4 MB otherwise,
    above the per-step tensors of small batches. Not glibc (macOS, musl): nothing to do."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 10 if zero3 else 4 << 20)
    if not zero3:
        # Ray Train runs the loop in a thread of its own, whose glibc arena hands every freed heap back to the
        # system as soon as it is free and faults it in again on the next step (about 100,000 page faults a step
        # on the throughput bench's larger model). Keep up to 64 MB free at the top of each heap for the next step.
        libc.mallopt(_M_TOP_PAD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def trim_freed_heap() -> None:
    """Hand back to the system what glibc's heaps hold free after a one-off burst of small tensors (building the
    engine; gathering the adapter's whole optimizer state for a checkpoint: 87 MB of a 300M model's 2-worker
    ZeRO-3 run, which its upload then added to). A few milliseconds, at set-up and at each checkpoint."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
