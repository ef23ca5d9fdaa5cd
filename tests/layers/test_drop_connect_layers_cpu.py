"""Per-sample DropConnect on the CPU path: mask statistics, gradients, bounded memory."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from lightning_dropout import DropConnectLinear, kernels

SIGMAS = 5.0


def peak_allocated_mib(fn: Callable[[], None]) -> float:
    """Peak MiB allocated above the start while ``fn()`` runs (torch.profiler's events)."""
    cpu_only = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu_only, profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, change in sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    ):
        live += change
        peak = max(peak, live)
    return peak / 2**20


@pytest.mark.parametrize("p", [0.3, 0.5, 1e-3])
def test_group_masks_keep_each_weight_with_probability_one_minus_p(p: float) -> None:
    generator = torch.Generator().manual_seed(0)
    masked = kernels.group_masked_weights(torch.ones(64, 128), 32, p, generator)
    assert masked.shape == (32, 64, 128)
    assert set(masked.unique().tolist()) <= {0.0, torch.tensor(1 / (1 - p)).item()}
    n = masked.numel()
    drops = int((masked == 0).sum())
    assert abs(drops - n * p) <= SIGMAS * max(1.0, math.sqrt(n * p * (1 - p)))
    per_group = (masked == 0).flatten(1).float().mean(1)
    assert per_group.std() > 0 or p < 0.01  # groups are not copies of one mask
    assert not torch.equal(masked[0], masked[1])


def test_group_masks_gradient() -> None:
    weight = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def fn(w: torch.Tensor) -> torch.Tensor:
        return kernels.group_masked_weights(w, 3, 0.4, torch.Generator().manual_seed(1))

    assert torch.autograd.gradcheck(fn, (weight,))
    masked = fn(weight)
    masked.sum().backward()
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, (masked.detach() != 0).sum(0).double() / 0.6)


def test_per_sample_forward_backward_memory_follows_the_budget_not_the_batch() -> None:
    # 64 samples of a 256 x 256 weight (256 KiB each): all masked weights at once would
    # take 16 MiB; a 1 MiB budget processes 4 samples at a time.
    layer = DropConnectLinear(256, 256, per_sample=True, max_mask_bytes=2**20)
    x = torch.randn(64, 256, requires_grad=True)
    layer(x).sum().backward()  # warm-up: parameter grads exist from here on

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    assert peak_allocated_mib(step) < 3.0
