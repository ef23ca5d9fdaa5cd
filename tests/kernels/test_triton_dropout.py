"""The Triton dropout kernels, run by Triton's interpreter on CPU tensors (fp32).

The reference regenerates the kernel's mask by running it on ones with the same seed and
computes the expected output in float64: the comparison is exact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("triton")

if TYPE_CHECKING:  # the fixture's type, defined beside the fixtures
    from tests.kernels.conftest import RecordingBackend

from lightning_dropout import Dropout, Dropout2d, GaussianDropout, kernels
from lightning_dropout.kernels import triton_dropconnect as dc
from lightning_dropout.kernels import triton_dropout as td

SHAPES = [(1,), (37,), (5, 7, 3), (3, 1031)]
RATE = torch.tensor(0.3, dtype=torch.float64)


def seed_of(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def expected_dropout(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor`` rounded once from float64, exactly 0 where ``factor`` is 0."""
    product = (x.double() * factor.double()).to(x.dtype)
    return torch.where(factor != 0, product, torch.zeros((), dtype=x.dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.3, 0.75])
def test_dropout_equals_reference_from_regenerated_mask(shape: tuple[int, ...], p: float) -> None:
    x = torch.randn(shape)
    y = td.dropout(x, p, seed=seed_of(7))
    factor = td.dropout(torch.ones_like(x), p, seed=seed_of(7))
    assert set(factor.unique().tolist()) <= {0.0, float(torch.tensor(1 / (1 - p)))}
    assert torch.equal(y, expected_dropout(x, factor))


def test_dropout_drops_infinities_and_nans_to_exact_zero() -> None:
    x = torch.full((4096,), float("inf"))
    x[::2] = float("nan")
    y = td.dropout(x, 0.5, seed=seed_of(3))
    dropped = td.dropout(torch.ones_like(x), 0.5, seed=seed_of(3)) == 0
    assert dropped.any()
    assert bool((y[dropped] == 0).all())


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.t(),  # dense, permuted: processed in storage order
        lambda x: x[:, ::2],  # not dense: made contiguous
        lambda x: x.t()[1:],  # neither contiguous nor dense
    ],
    ids=["transposed", "strided", "sliced-transposed"],
)
def test_dropout_non_contiguous_input(make: object) -> None:
    x = make(torch.randn(9, 34))  # type: ignore[operator]
    y = td.dropout(x, 0.5, seed=seed_of(11))
    factor = td.dropout(torch.ones_like(x), 0.5, seed=seed_of(11))
    assert torch.equal(y, expected_dropout(x, factor))
    if x.t().is_contiguous():
        assert y.stride() == x.stride()


def test_dropout_backward_regenerates_the_mask_for_any_gradient_layout() -> None:
    base = torch.randn(33, 10, requires_grad=True)
    x = base.t()
    y = td.dropout(x, 0.4, seed=seed_of(5))
    grad = torch.randn(10, 33)  # contiguous, unlike y
    y.backward(grad)
    factor = td.dropout(torch.ones_like(x), 0.4, seed=seed_of(5))
    assert base.grad is not None
    assert torch.equal(base.grad.t(), expected_dropout(grad, factor))


def test_dropout_rate_and_scaling_variants() -> None:
    ones = torch.ones(4096)
    inf = torch.full((64,), float("inf"))
    assert torch.equal(td.dropout(inf, 1.0), torch.zeros(64))
    assert torch.equal(td.dropout(ones, 0.0), ones)
    original = td.dropout(ones, 0.25, inverted=False)
    assert set(original.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(
        td.dropout(ones, torch.tensor(0.25), seed=seed_of(1)), td.dropout(ones, 0.25, seed=seed_of(1))
    )


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_drop_fraction_within_five_sigma(p: float) -> None:
    n = 2**16
    dropped = (td.dropout(torch.ones(n), p) == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_the_four_lanes_of_a_philox_call_are_uncorrelated() -> None:
    # Elements 4j..4j+3 share one Philox call: their masks must be independent, not
    # copies of each other (correlations within 5 sigma of 0).
    kept = (td.dropout(torch.ones(2**14), 0.5) != 0).double().reshape(-1, 4)
    corr = torch.corrcoef(kept.t())
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / math.sqrt(kept.shape[0])


def test_mask_does_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(5000)
    default = td.dropout(x, 0.5, seed=seed_of(6))
    monkeypatch.setattr(td, "BLOCK", 1024)
    assert torch.equal(td.dropout(x, 0.5, seed=seed_of(6)), default)


def test_seeds_come_from_torchs_generator() -> None:
    x = torch.ones(512)
    torch.manual_seed(123)
    first = td.dropout(x, 0.5)
    second = td.dropout(x, 0.5)
    torch.manual_seed(123)
    assert torch.equal(td.dropout(x, 0.5), first)
    assert not torch.equal(first, second)


def test_checkpoint_recomputation_draws_the_same_mask() -> None:
    def block(x: torch.Tensor) -> torch.Tensor:
        return td.dropout(x * 2, 0.5).sin()

    x = torch.randn(257, requires_grad=True)
    torch.manual_seed(9)
    block(x).sum().backward()
    assert x.grad is not None
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(9)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, plain)


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 5, 4, 7), (2, 3, 1, 2, 3), (1, 4, 4099)])
def test_channel_dropout_equals_reference(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, requires_grad=True)
    y = td.channel_dropout(x, 0.5, seed=seed_of(2))
    factor = td.channel_dropout(torch.ones(shape), 0.5, seed=seed_of(2))
    per_channel = factor.flatten(2)
    assert torch.equal(per_channel, per_channel[:, :, :1].expand_as(per_channel))
    assert torch.equal(y, expected_dropout(x.detach(), factor))
    grad = torch.randn(shape)
    y.backward(grad)
    assert x.grad is not None
    assert torch.equal(x.grad, expected_dropout(grad, factor))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(16, 48, 3, 3).to(memory_format=torch.channels_last),
        lambda: torch.randn(4, 5, 2, 3, 2).to(memory_format=torch.channels_last_3d),
        lambda: torch.randn(3, 7, 6).transpose(1, 2),  # (N, C, L) stored as (N, L, C)
    ],
    ids=["2d", "3d", "1d"],
)
def test_channel_dropout_keeps_channels_last_with_the_same_mask(make: object) -> None:
    x = make().requires_grad_(True)  # type: ignore[operator]
    y = td.channel_dropout(x, 0.25, seed=seed_of(4))
    assert y.stride() == x.stride()
    factor = td.channel_dropout(torch.ones(x.shape), 0.25, seed=seed_of(4))  # contiguous path
    assert torch.equal(y, expected_dropout(x.detach(), factor))
    grad = torch.randn(x.shape)  # contiguous, unlike y
    y.backward(grad)
    assert x.grad is not None
    assert torch.equal(x.grad, expected_dropout(grad, factor))


def test_channel_dropout_drop_fraction_within_five_sigma() -> None:
    factor = td.channel_dropout(torch.ones(64, 32, 2), 0.25)
    dropped = (factor[:, :, 0] == 0).double().mean().item()
    assert abs(dropped - 0.25) < 5 * math.sqrt(0.25 * 0.75 / (64 * 32))


@pytest.mark.parametrize("shape", [(1,), (5, 7, 3), (4099,)])
def test_gaussian_dropout_equals_reference(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).t() if len(shape) == 1 else torch.randn(shape).transpose(0, 2)
    x.requires_grad_(True)
    y = td.gaussian_dropout(x, 0.7, seed=seed_of(8))
    factor = td.gaussian_dropout(torch.ones_like(x), 0.7, seed=seed_of(8))
    assert torch.equal(y, (x.detach().double() * factor.double()).float())
    grad = torch.randn(shape).t() if len(shape) == 1 else torch.randn(shape).transpose(0, 2).contiguous()
    y.backward(grad)
    assert x.grad is not None
    assert torch.equal(x.grad, (grad.double() * factor.double()).float())


def test_gaussian_noise_moments_within_five_sigma() -> None:
    n, sigma = 2**16, 0.5
    noise = (td.gaussian_dropout(torch.ones(n), sigma).double() - 1) / sigma
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)
    assert abs(noise.var().item() - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize(
    ("op", "args"),
    [
        (td._dropout_op, (torch.randn(3, 5), seed_of(1), RATE, True)),
        (td._channel_dropout_op, (torch.randn(2, 3, 4), seed_of(1), RATE, True)),
        (
            td._channel_dropout_op,
            (torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last), seed_of(1), RATE, True),
        ),
        (td._gaussian_op, (torch.randn(3, 5).t(), seed_of(1), RATE)),
    ],
    ids=["dropout", "channel", "channels-last", "gaussian"],
)
def test_custom_op_registration_is_consistent(op: object, args: tuple[object, ...]) -> None:
    args[0].requires_grad_(True)  # type: ignore[union-attr]
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=checks)


def test_compile_keeps_one_graph_when_p_changes() -> None:
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return td.dropout(x, p).sum() + td.gaussian_dropout(x, p).sum() + td.channel_dropout(x, p).sum()

    x = torch.randn(4, 3, requires_grad=True)
    frames = []
    for p in (0.1, 0.2, 0.6):
        step(x, torch.tensor(p, dtype=torch.float64)).backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1
    assert frames[1:] == frames[:1] * 2


def test_compile_with_a_float_p_recompiles_at_most_once() -> None:
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step(x: torch.Tensor, p: float) -> torch.Tensor:
        return td.dropout(x, p)

    x = torch.randn(4, 3)
    for p in (0.1, 0.2, 0.3, 0.4):
        step(x, p)
    assert counter.frame_count <= 2


def test_dispatch_routes_layers_to_the_kernels(kernels_on_cpu: None) -> None:
    x = torch.randn(4, 3, 5, 5)
    for layer, direct in [
        (Dropout(0.3), lambda: td.dropout(x, 0.3)),
        (Dropout(0.3, inverted=False), lambda: td.dropout(x, 0.3, inverted=False)),
        (Dropout2d(0.3), lambda: td.channel_dropout(x, 0.3)),
        (GaussianDropout(0.3), lambda: td.gaussian_dropout(x, math.sqrt(0.3 / 0.7))),
    ]:
        torch.manual_seed(5)
        through_layer = layer(x)
        torch.manual_seed(5)
        assert torch.equal(through_layer, direct()), layer
    torch.manual_seed(5)
    in_place = Dropout(0.3, inplace=True)(x.clone())  # the reference path
    torch.manual_seed(5)
    assert not torch.equal(in_place, td.dropout(x, 0.3))


def test_compiled_layers_call_the_kernels_and_follow_p_without_recompiling(
    kernels_on_cpu: None, recording_backend: RecordingBackend
) -> None:
    backend = recording_backend
    layers = {
        "triton_dropout": Dropout(0.0),
        "triton_channel_dropout": Dropout2d(0.0),
        "triton_gaussian_dropout": GaussianDropout(0.0),
    }
    compiled = {op: torch.compile(layer, backend=backend) for op, layer in layers.items()}
    for p in (0.0, 0.3, 0.8, 1.0):
        for op, layer in layers.items():
            layer.p = p
            x = torch.randn(6, 5, 4, 4, requires_grad=True)
            out = compiled[op](x)
            out.backward(torch.ones_like(out))
            assert x.grad is not None
            # The gradient is the factor the kernel applied, regenerated from the seed.
            assert torch.equal(out, expected_dropout(x.detach(), x.grad)), (op, p)
            if op != "triton_gaussian_dropout":
                kept = {0.0, float(torch.tensor(1 / (1 - p)))} if p < 1 else {0.0}
                assert set(x.grad.unique().tolist()) <= kept
            if op == "triton_channel_dropout":
                assert torch.equal(x.grad, x.grad[:, :, :1, :1].expand_as(x.grad))
            if p == 0.0:
                assert torch.equal(out, x)
            if p == 1.0:
                assert not out.any() and not x.grad.any()
    for op in layers:
        assert f"lightning_dropout.{op}.default" in backend.ops
    assert backend.graphs == 3  # one graph per layer


def test_compiled_unbatched_channels_use_the_kernels_and_drop_connect_compiles(
    kernels_on_cpu: None, recording_backend: RecordingBackend
) -> None:
    from lightning_dropout import DropConnectLinear

    backend, names = recording_backend, recording_backend.ops
    unbatched = torch.compile(Dropout2d(0.5, batched=False), backend=backend)
    out = unbatched(torch.ones(7, 3, 3))
    assert torch.equal(out, out[:, :1, :1].expand_as(out)) and set(out.unique().tolist()) <= {0.0, 2.0}
    assert "lightning_dropout.triton_channel_dropout.default" in names
    # one-mask DropConnect masks its weight with torch ops (layers/drop_connect.py)
    layer = DropConnectLinear(64, 32, p=0.5, bias=False)
    out = torch.compile(layer, backend=backend)(torch.eye(64))
    assert set(out.t().div(layer.weight.detach()).unique().tolist()) <= {0.0, 2.0}


def test_compiled_in_place_dropout_keeps_the_torch_rule(
    kernels_on_cpu: None, recording_backend: RecordingBackend
) -> None:
    backend, names = recording_backend, recording_backend.ops
    x = torch.ones(5, 8)
    torch.compile(Dropout(0.5, inplace=True), backend=backend)(x)
    assert set(x.unique().tolist()) <= {0.0, 2.0} and (x == 0).any()
    assert not any(name.startswith("lightning_dropout.") for name in names)


def assert_matches_fp32_product(out: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> None:
    """``out`` is the fp32 product ``x * factor`` (the kernel's arithmetic) cast to ``out``'s
    dtype: exactly for fp16; for bf16 the zeros exactly and the values within one unit in
    the last place, because the interpreter truncates bf16 where the GPU rounds (the GPU
    script compares bf16 exactly)."""
    product = x.float() * factor
    expected = product.to(out.dtype)
    if out.dtype == torch.bfloat16:
        assert torch.equal(out == 0, expected == 0)
        ulp = torch.finfo(torch.bfloat16).eps * product.abs()
        assert bool(((out.float() - product).abs() <= ulp).all())
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels_apply_the_fp32_mask(dtype: torch.dtype) -> None:
    """Half-precision inputs meet the same mask as fp32 ones (the mask depends on the seed and
    the position only), scaled in fp32."""
    x = torch.randn(6, 5, 3, 7).to(dtype).requires_grad_(True)
    for function, rate in [(td.dropout, 0.3), (td.channel_dropout, 0.3), (td.gaussian_dropout, 0.7)]:
        y = function(x, rate, seed=seed_of(9))  # type: ignore[operator]
        factor = function(torch.ones(x.shape), rate, seed=seed_of(9))  # type: ignore[operator]
        assert y.dtype == dtype
        assert_matches_fp32_product(y.detach(), x.detach(), factor)
        grad = torch.randn(x.shape).to(dtype)
        (x_grad,) = torch.autograd.grad(y, x, grad)
        assert_matches_fp32_product(x_grad, grad, factor)


def test_the_switch_keeps_cuda_tensors_on_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert kernels._import_triton_kernels() == (td, dc)
    monkeypatch.setenv(kernels.TRITON_SWITCH, "0")
    assert kernels._import_triton_kernels() == (None, None)
