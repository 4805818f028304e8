"""LoRA-FA's dropout, which keeps a seed instead of a mask for backward. A module of its own (private
to the registry, which imports only method modules) because defining it needs torch, and reading a
job spec should not."""

from __future__ import annotations

import torch


class _SeededDropout(torch.autograd.Function):
    """Dropout that keeps only a seed for backward and regenerates the mask from it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return x * _keep_mask(x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * _keep_mask(grad, ctx.p, ctx.seed), None, None


def _keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return mask.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)


class SeededDropout(torch.nn.Module):
    """Drop-in for nn.Dropout on a path whose input is not otherwise kept for backward."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # Drawn from torch's global RNG, so a resumed run (which restores it) drops the same units.
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return _SeededDropout.apply(x, self.p, seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"
