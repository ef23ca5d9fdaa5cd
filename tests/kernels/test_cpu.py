"""The CPU fast path: exact keep distribution, reproducibility, gradients, edge values.

Statistical tests use fixed seeds and a 5-sigma tolerance on binomial counts (a false
failure has probability below 1e-6 per check; with the seeds fixed, none is flaky).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lightning_dropout import Dropout, Dropout1d, Dropout2d, Dropout3d, kernels
from lightning_dropout.kernels import cpu

SIGMAS = 5.0
N = 1 << 22

# Values on the first byte's grid, off it (the tie resolution decides), tiny and close to 1.
PROBABILITIES = [0.5, 0.75, 0.3, 1 / 3, 0.1, 0.9, 0.999, 1e-3, 1e-5, 0.3 * 2**-16, 0.5 + 2**-12]


def assert_binomial(count: int, trials: int, probability: float) -> None:
    sd = math.sqrt(trials * probability * (1.0 - probability))
    assert abs(count - trials * probability) <= SIGMAS * max(sd, 1.0), (count, trials * probability, sd)


@pytest.mark.parametrize("p", [0.3, 1 / 3, 0.5, 1e-5, 0.999, 2**-1074, 1 - 2**-53])
def test_probability_digits_are_the_exact_expansion(p: float) -> None:
    digits = cpu.probability_digits(p)
    assert sum(Fraction(d, 256 ** (k + 1)) for k, d in enumerate(digits)) == Fraction(p)


@pytest.mark.parametrize("p", PROBABILITIES)
def test_each_element_kept_with_probability_one_minus_p(p: float) -> None:
    keep = cpu.keep_bytes(N, p)
    assert keep.dtype == torch.int8 and keep.shape == (N,)
    assert set(keep.unique().tolist()) <= {-1, 0}
    assert_binomial(int((keep == 0).sum()), N, p)


def test_off_grid_probability_is_not_rounded_to_the_first_byte() -> None:
    # 0.3 lies between 76/256 and 77/256; with 4M draws either rounding is > 13 sigmas off.
    drops = int((cpu.keep_bytes(N, 0.3) == 0).sum())
    assert_binomial(drops, N, 0.3)
    assert abs(drops / N - 76 / 256) > 10 * math.sqrt(0.21 / N)


@pytest.mark.parametrize("p", [0.3, 0.5, 1e-3])
def test_every_lane_of_a_word_and_neighbours_are_independent(p: float) -> None:
    kept = (cpu.keep_bytes(N, p) != 0).view(-1, 8)
    for lane in range(8):
        assert_binomial(int(kept[:, lane].sum()), kept.shape[0], 1 - p)
    flat = kept.flatten()
    both = int((flat[:-1] & flat[1:]).sum())
    assert_binomial(both, flat.numel() - 1, (1 - p) ** 2)


def test_reproducible_under_manual_seed_and_generators() -> None:
    torch.manual_seed(123)
    first = cpu.keep_bytes(100_003, 0.3)
    torch.manual_seed(123)
    assert torch.equal(first, cpu.keep_bytes(100_003, 0.3))
    assert not torch.equal(first, cpu.keep_bytes(100_003, 0.3))
    a = cpu.keep_bytes(5000, 0.7, torch.Generator().manual_seed(9))
    b = cpu.keep_bytes(5000, 0.7, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_dropout_output_values_and_gradient_follow_the_mask() -> None:
    x = torch.randn(300, 1000, requires_grad=True)
    y = cpu.dropout(x, 0.3, 1 / 0.7)
    kept = y != 0
    assert torch.equal(y[kept], (x * (1 / 0.7))[kept])
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * (1 / 0.7), torch.zeros(())))


def test_gradcheck_and_gradgradcheck() -> None:
    x = torch.randn(kernels.CPU_MIN_NUMEL, dtype=torch.float64, requires_grad=True)

    def fn(t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(5)  # the same mask on every call
        return cpu.dropout(t, 0.4, 1 / 0.6)

    assert torch.autograd.gradcheck(fn, x, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, x, fast_mode=True)


def test_dropped_infinities_and_nans_give_exact_zeros() -> None:
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.0]).repeat(4096)
    y = cpu.dropout(x, 0.5, 2.0)
    reference_kept = (y != 0) & ~(y.isnan())
    assert int((y == 0).sum()) > 0
    assert bool(torch.isinf(y[0::4][y[0::4] != 0]).all())
    assert bool((y[3::4][reference_kept[3::4]] == 2.0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    y = cpu.dropout(torch.ones(10_000, dtype=dtype), 0.75, 4.0)
    assert y.dtype == dtype and set(y.unique().tolist()) == {0.0, 4.0}


def test_inplace_and_non_contiguous_inputs_match_the_contiguous_result() -> None:
    x = torch.randn(200, 300)
    torch.manual_seed(1)
    expected = cpu.dropout(x.t().contiguous(), 0.3, 2.0)
    torch.manual_seed(1)
    assert torch.equal(cpu.dropout(x.t(), 0.3, 2.0), expected)
    z = x.t().contiguous()
    torch.manual_seed(1)
    out = cpu.dropout(z, 0.3, 2.0, inplace=True)
    assert out is z and torch.equal(z, expected)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize(
    ("layer", "shape"),
    [(Dropout1d, (256, 128, 16)), (Dropout2d, (256, 128, 4, 4)), (Dropout3d, (128, 256, 2, 2, 4))],
)
def test_channels_kept_with_probability_one_minus_p(layer: type, shape: tuple[int, ...], p: float) -> None:
    x = torch.ones(shape, requires_grad=True)
    y = layer(p=p)(x)
    flat = y.flatten(2)
    assert bool((flat.amax(2) == flat.amin(2)).all()), "whole channels"
    assert set(flat[:, :, 0].unique().tolist()) <= {0.0, torch.tensor(1 / (1 - p)).item()}
    assert_binomial(int((flat[:, :, 0] == 0).sum()), shape[0] * shape[1], p)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_the_layers_take_the_fast_path_for_large_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cpu, "keep_bytes", lambda *a, _f=cpu.keep_bytes: calls.append("fast") or _f(*a))
    Dropout(0.5)(torch.ones(kernels.CPU_MIN_NUMEL))
    Dropout2d(0.5)(torch.ones(16, 16, 4, 4))
    Dropout(0.5)(torch.ones(3, 5))
    assert calls == ["fast", "fast"]


def test_slides_example_on_a_fast_path_tensor() -> None:
    x = torch.ones(64, 128, requires_grad=True)
    y = Dropout(p=0.75)(x)
    assert set(y.unique().tolist()) <= {0.0, 4.0}
    y.norm(2, 1).sum().backward()
    k = (y != 0).sum(1, keepdim=True).float()
    expected = torch.where(y != 0, 4 / k.sqrt(), torch.zeros(()))
    torch.testing.assert_close(x.grad, expected)


def test_dropped_channels_are_exact_zeros_even_over_infinities_and_nans() -> None:
    x = torch.randn(8, 16, 64, requires_grad=True)
    with torch.no_grad():
        x[:, :, 3] = math.inf
        x[:, :, 5] = math.nan
    y = cpu.channel_dropout(x, 0.5, 2.0)
    dropped = y[:, :, 0] == 0
    assert 0 < int(dropped.sum()) < dropped.numel()
    assert bool((y[dropped] == 0).all()) and not bool(y[dropped].signbit().any())
    assert bool(y[~dropped][:, 5].isnan().all())
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    assert bool((x.grad[dropped] == 0).all()) and bool((x.grad[~dropped] == 2.0).all())


def test_drop_connect_uses_the_exact_mask_on_cpu() -> None:
    from lightning_dropout.layers import drop_connect

    w = drop_connect(torch.ones(512, 512), p=0.3)
    assert set(w.unique().tolist()) == {0.0, torch.tensor(1 / 0.7).item()}
    assert_binomial(int((w == 0).sum()), w.numel(), 0.3)
