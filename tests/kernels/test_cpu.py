"""The CPU fast path: exact keep distribution, reproducibility, gradients, edge values.

Statistical tests use fixed seeds and a 5-sigma tolerance on binomial counts (a false
failure has probability below 1e-6 per check; with the seeds fixed, none is flaky). The
numba kernels and the torch ops that replace them where numba is missing are run side by
side (the ``paths`` fixture) and must give the same values from the same seed.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import signal
import struct
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_dropout import Dropout, Dropout1d, Dropout2d, Dropout3d, GaussianDropout, kernels
from lightning_dropout.kernels import cpu

SIGMAS = 5.0
N = 1 << 22

# Values on the first byte's grid, off it (the tie resolution decides), tiny and close to 1.
PROBABILITIES = [0.5, 0.75, 0.3, 1 / 3, 0.1, 0.9, 0.999, 1e-3, 1e-5, 0.3 * 2**-16, 0.5 + 2**-12]


@pytest.fixture(params=["numba", "torch ops"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the numba kernels, then on the torch ops that replace them."""
    if request.param == "numba" and cpu.compiled() is None:
        pytest.skip("numba is not installed")
    if request.param == "torch ops":
        monkeypatch.setattr(cpu, "compiled", lambda: None)
    return str(request.param)


def assert_binomial(count: int, trials: int, probability: float) -> None:
    sd = math.sqrt(trials * probability * (1.0 - probability))
    assert abs(count - trials * probability) <= SIGMAS * max(sd, 1.0), (count, trials * probability, sd)


@pytest.mark.parametrize("p", [0.3, 1 / 3, 0.5, 1e-5, 0.999, 2**-1074, 1 - 2**-53])
def test_probability_digits_are_the_exact_expansion(p: float) -> None:
    digits = cpu.probability_digits(p)
    assert sum(Fraction(d, 256 ** (k + 1)) for k, d in enumerate(digits)) == Fraction(p)


@pytest.mark.parametrize("p", PROBABILITIES)
def test_each_element_kept_with_probability_one_minus_p(p: float) -> None:
    keep = cpu.keep_mask(N, p)
    assert keep.dtype == torch.bool and keep.shape == (N,)
    assert_binomial(int((~keep).sum()), N, p)


def test_off_grid_probability_is_not_rounded_to_the_first_byte() -> None:
    # 0.3 lies between 76/256 and 77/256; with 4M draws either rounding is > 13 sigmas off.
    drops = int((~cpu.keep_mask(N, 0.3)).sum())
    assert_binomial(drops, N, 0.3)
    assert abs(drops / N - 76 / 256) > 10 * math.sqrt(0.21 / N)


@pytest.mark.parametrize("p", [0.3, 0.5, 1e-3])
def test_every_lane_of_a_word_and_neighbours_are_independent(p: float) -> None:
    kept = cpu.keep_mask(N, p).view(-1, 8)
    for lane in range(8):
        assert_binomial(int(kept[:, lane].sum()), kept.shape[0], 1 - p)
    flat = kept.flatten()
    both = int((flat[:-1] & flat[1:]).sum())
    assert_binomial(both, flat.numel() - 1, (1 - p) ** 2)


def test_reproducible_under_manual_seed_and_generators() -> None:
    torch.manual_seed(123)
    first = cpu.keep_mask(100_003, 0.3)
    torch.manual_seed(123)
    assert torch.equal(first, cpu.keep_mask(100_003, 0.3))
    assert not torch.equal(first, cpu.keep_mask(100_003, 0.3))
    a = cpu.keep_mask(5000, 0.7, torch.Generator().manual_seed(9))
    b = cpu.keep_mask(5000, 0.7, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_dropout_output_values_and_gradient_follow_the_mask(path: str) -> None:
    x = torch.randn(300, 1000, requires_grad=True)
    y = cpu.dropout(x, 0.3, 1 / 0.7)
    kept = y != 0
    assert torch.equal(y[kept], (x * (1 / 0.7))[kept])
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * (1 / 0.7), torch.zeros(())))


def test_gradcheck_and_gradgradcheck(path: str) -> None:
    x = torch.randn(kernels.CPU_MIN_NUMEL, dtype=torch.float64, requires_grad=True)

    def fn(t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(5)  # the same mask on every call
        return cpu.dropout(t, 0.4, 1 / 0.6)

    assert torch.autograd.gradcheck(fn, x, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, x, fast_mode=True)


def test_dropped_infinities_and_nans_give_exact_zeros(path: str) -> None:
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.0]).repeat(4096)
    y = cpu.dropout(x, 0.5, 2.0)
    reference_kept = (y != 0) & ~(y.isnan())
    assert int((y == 0).sum()) > 0
    assert bool(torch.isinf(y[0::4][y[0::4] != 0]).all())
    assert bool((y[3::4][reference_kept[3::4]] == 2.0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype, path: str) -> None:
    y = cpu.dropout(torch.ones(10_000, dtype=dtype), 0.75, 4.0)
    assert y.dtype == dtype and set(y.unique().tolist()) == {0.0, 4.0}


def test_inplace_and_non_contiguous_inputs_match_the_contiguous_result(path: str) -> None:
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
def test_channels_kept_with_probability_one_minus_p(
    layer: type, shape: tuple[int, ...], p: float, path: str
) -> None:
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
    monkeypatch.setattr(cpu, "_draw", lambda *a, _f=cpu._draw: calls.append("mask") or _f(*a))
    monkeypatch.setattr(
        cpu, "gaussian_dropout", lambda *a, _f=cpu.gaussian_dropout: calls.append("gaussian") or _f(*a)
    )
    Dropout(0.5)(torch.ones(kernels.CPU_MIN_NUMEL))
    Dropout2d(0.5)(torch.ones(kernels.CPU_MIN_NUMEL_CHANNELS // 64, 16, 2, 2))
    GaussianDropout(0.5)(torch.ones(kernels.CPU_MIN_NUMEL_GAUSSIAN))
    assert calls == ["mask", "mask", "gaussian"]
    Dropout(0.5)(torch.ones(kernels.CPU_MIN_NUMEL - 1))  # small inputs: the reference path
    Dropout2d(0.5)(torch.ones(kernels.CPU_MIN_NUMEL_CHANNELS // 64 - 1, 16, 2, 2))
    GaussianDropout(0.5)(torch.ones(kernels.CPU_MIN_NUMEL_GAUSSIAN - 1))
    assert len(calls) == 3


def test_slides_example_on_a_fast_path_tensor() -> None:
    x = torch.ones(64, 128, requires_grad=True)
    y = Dropout(p=0.75)(x)
    assert set(y.unique().tolist()) <= {0.0, 4.0}
    y.norm(2, 1).sum().backward()
    k = (y != 0).sum(1, keepdim=True).float()
    expected = torch.where(y != 0, 4 / k.sqrt(), torch.zeros(()))
    torch.testing.assert_close(x.grad, expected)


def test_passes_write_nothing_past_their_tensors(path: str) -> None:
    # entries that are not a multiple of 8: the last mask word covers entries past the end
    for numel, shape in [(6 * 4, (2, 3, 4)), (13, (13,)), (5 * 3, (1, 5, 3))]:
        storage = torch.full((numel + 64,), 7.0)
        x = storage[:numel].view(shape)
        if len(shape) > 1:
            cpu.channel_dropout(x, 0.5, 2.0, inplace=True)
        else:
            cpu.dropout(x, 0.5, 2.0, inplace=True)
        assert bool((storage[numel:] == 7.0).all()), shape
        assert set(x.unique().tolist()) <= {0.0, 14.0}


def test_dropped_channels_are_exact_zeros_even_over_infinities_and_nans(path: str) -> None:
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


def _dropout_everywhere(seed: int) -> list[torch.Tensor]:
    """Outputs and gradients of every CPU-path function on awkward inputs, from one seed."""
    torch.manual_seed(seed)
    results = []
    for numel, p in [(1, 0.3), (7, 0.5), (9, 0.1), (4097, 1 / 3), (70_001, 0.5), (100_003, 0.5 + 2**-12)]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = torch.randn(numel, dtype=dtype, requires_grad=True)
            y = cpu.dropout(x, p, 1 / (1 - p))
            y.backward(torch.randn_like(y))
            results += [y, x.grad]
    x = torch.randn(300, 1000, requires_grad=True)
    for args in [(x.t(), 0.3, 2.0), (x, 0.75, 1.0)]:  # non-contiguous; original scaling
        results.append(cpu.dropout(*args))
    for length in (1, 3, 16, 64):  # one element a channel, short and long rows
        x = torch.randn(8, 32, length, requires_grad=True)
        y = cpu.channel_dropout(x, 0.3, 1 / 0.7)
        y.backward(torch.ones_like(y))
        results += [y, x.grad]
    weight = torch.randn(24, 40, requires_grad=True)
    masked = cpu.group_masked_weights(weight, 5, 0.3, torch.Generator().manual_seed(seed))
    masked.backward(torch.randn(40, 24, 5).permute(2, 1, 0))  # the transposed grad of a bmm
    results += [masked, weight.grad]
    return results


def test_numba_and_torch_ops_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu.compiled() is None:
        pytest.skip("numba is not installed")
    compiled = _dropout_everywhere(3)
    monkeypatch.setattr(cpu, "compiled", lambda: None)
    by_torch_ops = _dropout_everywhere(3)
    for a, b in zip(compiled, by_torch_ops, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # and the values are right: dropout keeps x * scale or gives 0
    torch.manual_seed(4)
    x = torch.randn(100_003)
    y = cpu.dropout(x, 0.3, 1 / 0.7)
    assert torch.equal(y, torch.where(y != 0, x * (1 / 0.7), 0.0))


def test_gaussian_noise_is_standard_normal_and_reproducible(path: str) -> None:
    # float64 ones and sigma 1: the output minus 1 is the noise itself
    torch.manual_seed(6)
    noise = cpu.gaussian_dropout(torch.ones(N, dtype=torch.float64), 1.0) - 1.0
    assert abs(noise.mean().item()) <= SIGMAS / math.sqrt(N)
    assert abs(noise.var().item() - 1.0) <= SIGMAS * math.sqrt(2 / N)
    # the rectangles, the wedges and the tail beyond the last layer (3.654) of the ziggurat
    for bound in (0.5, 2.0, 3.6541528853610088, 4.5):
        assert_binomial(int((noise.abs() > bound).sum()), N, math.erfc(bound / math.sqrt(2)))
    # Kolmogorov-Smirnov distance from N(0, 1), at a 1e-6 false-failure level
    ordered = noise.sort().values
    empirical = torch.arange(1, N + 1, dtype=torch.float64) / N
    distance = (empirical - torch.special.ndtr(ordered)).abs().max().item()
    assert distance <= math.sqrt(math.log(2 / 1e-6) / 2) / math.sqrt(N) + 1 / N
    torch.manual_seed(6)
    again = cpu.gaussian_dropout(torch.ones(N, dtype=torch.float64), 1.0) - 1.0
    assert torch.equal(again, noise)
    single = cpu.gaussian_dropout(torch.ones(N // 4), 0.5)  # float32: the same law
    assert abs(single.mean().item() - 1.0) <= SIGMAS * 0.5 / math.sqrt(N // 4)


def test_gaussian_gradient_is_the_noise(path: str) -> None:
    x = torch.randn(3000, dtype=torch.float64, requires_grad=True)
    y = cpu.gaussian_dropout(x, 0.5)
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    torch.testing.assert_close(x.grad * x.detach(), y.detach())

    def fixed_noise(t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(2)
        return cpu.gaussian_dropout(t, 0.5)

    assert torch.autograd.gradgradcheck(fixed_noise, x[:50].detach().requires_grad_(), fast_mode=True)


def test_switch_and_compile_failure_fall_back_to_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu.compiled() is None:
        pytest.skip("numba is not installed")
    from lightning_dropout.kernels import _compiled

    try:
        cpu.compiled.cache_clear()
        monkeypatch.setenv(cpu.NUMBA_SWITCH, "0")
        assert cpu.compiled() is None
        cpu.compiled.cache_clear()
        monkeypatch.delenv(cpu.NUMBA_SWITCH)

        def broken(*args: object) -> None:
            raise RuntimeError("no LLVM here")

        monkeypatch.setattr(_compiled, "splitmix", broken)
        with pytest.warns(RuntimeWarning, match="no LLVM here"):
            assert cpu.compiled() is None
        x = torch.ones(10_000)
        assert set(cpu.dropout(x, 0.5, 2.0).unique().tolist()) == {0.0, 2.0}
    finally:
        monkeypatch.undo()
        cpu.compiled.cache_clear()
    assert cpu.compiled() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_masked_linear_multiplies_by_the_group_masks(dtype: torch.dtype) -> None:
    if cpu.compiled() is None:
        assert cpu.group_masked_linear(torch.ones(2, 1, 3), torch.ones(4, 3), 0.5, [1]) is None
        return
    x = torch.randn(6, 3, 256, dtype=dtype, requires_grad=True)  # 6 groups of 3 rows
    weight = torch.randn(256, 256, dtype=dtype, requires_grad=True)  # 2^18 masks a chunk: threads
    y = cpu.group_masked_linear(x, weight, 0.3, [6, 7])  # two chunks of 3 groups
    masked = torch.cat(
        [cpu.group_masked_weights(weight, 3, 0.3, torch.Generator().manual_seed(s)) for s in (6, 7)]
    )
    expected = torch.bmm(x, masked.transpose(1, 2))
    assert y is not None and y.dtype == dtype
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(y, expected, **tolerance)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight), upstream)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, weight), upstream), strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def test_large_passes_in_threads_and_after_a_fork(path: str) -> None:
    x = torch.randn(1 << 22)  # above the size that shares a pass among threads
    torch.manual_seed(2)
    y = cpu.dropout(x, 0.3, 1 / 0.7)
    assert torch.equal(y, torch.where(y != 0, x * (1 / 0.7), 0.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(2)
        assert torch.equal(cpu.dropout(x, 0.3, 1 / 0.7), y)  # one thread: the same values
    finally:
        torch.set_num_threads(threads)
    if path != "numba":
        return
    # A forked child runs its passes on one thread: GNU OpenMP hangs in a child forked
    # after the parent used it (the child runs no parallel torch op either).
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            torch.manual_seed(2)
            os.write(write, struct.pack("d", cpu.dropout(x, 0.3, 1 / 0.7).numpy().sum(dtype=np.float64)))
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert select.select([read], [], [], 60)[0], "the forked child did not answer"
        (total,) = struct.unpack("d", os.read(read, 8))
    finally:
        os.close(read)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert total == y.numpy().sum(dtype=np.float64)


def test_a_pass_kept_waiting_by_a_late_thread_runs_the_next_passes_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels = cpu.compiled()
    if kernels is None or cpu._openmp_parallel() is None:
        pytest.skip("needs numba and torch's OpenMP runtime")

    def late_team(serve: int, header: object, threads: int, flags: int) -> None:
        # the calling thread does every piece; the other thread shows up 3 ms later
        ctypes.CFUNCTYPE(None, ctypes.c_void_p)(serve)(header)
        time.sleep(0.003)
        ctypes.CFUNCTYPE(None, ctypes.c_void_p)(serve)(header)

    monkeypatch.setattr(cpu, "_openmp_parallel", lambda: late_team)
    monkeypatch.setattr(cpu, "_THREADS", cpu._Threads())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(1 << 20)
    assert cpu._THREADS.count(x.numel()) == 2
    torch.manual_seed(3)
    y = cpu.dropout(x, 0.3, 1 / 0.7)
    assert cpu._THREADS.count(x.numel()) == 1  # the host is busy: passes run alone
    assert torch.equal(y, torch.where(y != 0, x * (1 / 0.7), 0.0))
    torch.manual_seed(3)
    assert torch.equal(cpu.dropout(x, 0.3, 1 / 0.7), y)  # alone: the same values
    cpu._THREADS.serial_until = 0.0  # the pause is over
    assert cpu._THREADS.count(x.numel()) == 2
    assert cpu._THREADS.count(1000) == 1  # too little work to share at any time


def test_compiled_masks_are_the_torch_ops_masks_for_every_leading_digit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if cpu.compiled() is None:
        pytest.skip("numba is not installed")
    # every first digit, on the 1/256 grid and off it (ties then go to the tie stream)
    for digit in range(256):
        for p in ([digit / 256] if digit else []) + [(digit + s) / 256 for s in (0.5, 2**-40, 1 - 2**-44)]:
            draw = cpu._Draw(p, 4099, (digit * 7919 - 2**62, -digit))
            assert torch.equal(cpu._keep(draw), cpu._keep_by_torch_ops(draw)), p


def test_inputs_and_weights_keep_resizable_storage(path: str) -> None:
    # FSDP2 frees gathered parameters by resizing their storage to 0; Tensor.numpy() would
    # have made it fixed for good.
    x = torch.randn(64, 300, requires_grad=True)
    weight = torch.randn(40, 300, requires_grad=True)
    y = (
        cpu.dropout(x, 0.3, 1 / 0.7)
        + cpu.channel_dropout(x[:, :, None].expand(64, 300, 32).contiguous(), 0.5, 2.0)[:, :, 0]
    )
    z = cpu.gaussian_dropout(x, 0.5)
    out = cpu.group_masked_linear(x.view(8, 8, 300), weight, 0.5, [1, 2])
    total = y.sum() + z.sum() + (0 if out is None else out.sum())
    total.backward()
    touched = [x, y, z, x.grad] + ([] if out is None else [weight, out, weight.grad])
    for tensor in touched:
        assert tensor is not None
        tensor.untyped_storage().resize_(0)
