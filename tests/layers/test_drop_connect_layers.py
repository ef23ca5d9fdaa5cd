"""DropConnect layers: weight masks per batch / per sample / per group, Gaussian
inference, memory-bounded chunking, gradients and bad inputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dropout import (
    DropConnectConv1d,
    DropConnectConv2d,
    DropConnectConv3d,
    DropConnectLinear,
    kernels,
)
from lightning_dropout.kernels import _cpu as cpu
from lightning_dropout.layers import drop_connect


@pytest.fixture
def materialised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample linear layers mask their weights and multiply, as convolutions do (the
    CPU kernel that multiplies by the masks without materialising them is switched off)."""
    monkeypatch.setattr(kernels, "fits_group_masked_linear", lambda *args: False)


def test_drop_connect_weight_values_and_rate() -> None:
    w = drop_connect(torch.ones(500, 400), p=0.3)
    torch.testing.assert_close(w[w != 0], torch.full_like(w[w != 0], 1 / 0.7))
    kept = float((w != 0).float().mean())
    assert abs(kept - 0.7) < 5 * math.sqrt(0.21 / w.numel())


def test_is_a_drop_in_linear() -> None:
    layer = DropConnectLinear(5, 3)
    plain = nn.Linear(5, 3)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 5)
    assert torch.equal(layer.eval()(x), plain(x))


def test_per_batch_mask_is_shared_and_per_sample_masks_differ() -> None:
    x = torch.randn(1, 16).expand(8, 16)
    shared = DropConnectLinear(16, 32, p=0.5)(x)
    # equal up to rounding: BLAS may compute some rows of a matmul with other kernels
    assert all(torch.allclose(shared[0], row, rtol=1e-5, atol=1e-6) for row in shared)
    own = DropConnectLinear(16, 32, p=0.5, per_sample=True)(x)
    assert not any(torch.allclose(own[0], row, rtol=1e-3) for row in own[1:])


def test_mask_groups_give_independent_masks_per_group() -> None:
    layer = DropConnectLinear(16, 32, p=0.5)
    layer.mask_groups = 4
    y = layer(torch.randn(1, 16).expand(8, 16))
    groups = y.reshape(4, 2, 32)
    assert all(torch.allclose(g[0], g[1], rtol=1e-5, atol=1e-6) for g in groups)  # one mask a group
    assert not torch.allclose(groups[0, 0], groups[1, 0], rtol=1e-3)  # new mask per group
    with pytest.raises(ValueError, match="not a multiple"):
        layer(torch.randn(6, 16))


@pytest.mark.parametrize("per_sample", [False, True])
def test_unbiased_linear(per_sample: bool) -> None:
    torch.manual_seed(0)
    p, draws = 0.5, 3000
    layer = DropConnectLinear(6, 3, p=p, per_sample=per_sample).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        mean = torch.stack([layer(x) for _ in range(draws)]).mean(0)
        expected = layer.eval()(x)
    # Var of one output: p / (1 - p) * sum_i W_oi^2 x_i^2.
    variance = (p / (1 - p)) * F.linear(x * x, layer.weight * layer.weight)
    assert bool(((mean - expected).abs() < 5 * (variance / draws).sqrt()).all())


def _reference_per_group(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    outs = []
    for group, w in zip(x, weights, strict=True):
        outs.append(layer._product(group, w, layer.bias))
    return torch.stack(outs)


@pytest.mark.parametrize(
    "layer",
    [
        DropConnectLinear(5, 4),
        DropConnectConv1d(3, 4, 3, padding=1, padding_mode="reflect"),
        DropConnectConv2d(4, 6, 3, stride=2, groups=2),
        DropConnectConv3d(2, 3, 2, bias=False),
    ],
    ids=["linear", "conv1d-reflect", "conv2d-groups", "conv3d"],
)
def test_grouped_product_equals_a_loop_over_groups(layer: nn.Module) -> None:
    layer = layer.double()
    spatial = getattr(layer, "spatial_dims", 0)
    in_size = layer.in_features if spatial == 0 else layer.in_channels
    x = torch.randn(3, 2, in_size, *([5] * spatial), dtype=torch.float64)
    weights = torch.randn(3, *layer.weight.shape, dtype=torch.float64)
    torch.testing.assert_close(
        layer._grouped_product(x, weights, layer.bias), _reference_per_group(layer, x, weights)
    )


@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_with_fixed_masks(per_sample: bool) -> None:
    layer = DropConnectConv1d(2, 3, 3, p=0.4, per_sample=per_sample, max_mask_bytes=1).double()

    def fixed_masks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)
        return torch.func.functional_call(layer, {"weight": w}, (x,))

    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fixed_masks, (x, w))


def test_per_sample_memory_is_bounded_by_chunks(materialised: None) -> None:
    # 64 samples of a 256 x 256 float32 weight (256 KiB each) under a 1 MiB budget: at
    # most 4 samples' masks at once, so 16 chunks, each checkpointed.
    layer = DropConnectLinear(256, 256, per_sample=True, max_mask_bytes=2**20)
    calls: list[int] = []
    original = layer._grouped_product

    def counting(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        calls.append(w.shape[0])
        return original(x, w, b)

    layer._grouped_product = counting  # type: ignore[method-assign]
    x = torch.randn(64, 256, requires_grad=True)
    layer(x).sum().backward()
    assert max(calls) == 4
    assert sum(calls) == 2 * 64  # every chunk recomputed once in backward


def test_per_sample_backward_regenerates_the_forward_masks(materialised: None) -> None:
    layer = DropConnectLinear(4, 3, p=0.5, per_sample=True, max_mask_bytes=1).double()
    seen: list[torch.Tensor] = []
    original = layer._grouped_product

    def recording(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        seen.append(w.detach().clone())
        return original(x, w, b)

    layer._grouped_product = recording  # type: ignore[method-assign]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    forward, backward = seen[:5], seen[5:]
    # Backward recomputes the chunks (in reverse order) with the same masks.
    assert all(torch.equal(f, b) for f, b in zip(forward, reversed(backward), strict=True))
    masked = torch.cat(forward)  # (5, 3, 4): sample b's masked weight
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.einsum("bo,boi->bi", upstream, masked))
    assert layer.weight.grad is not None
    scaled_masks = masked / layer.weight.detach()
    expected = torch.einsum("bo,bi,boi->oi", upstream, x.detach(), scaled_masks)
    torch.testing.assert_close(layer.weight.grad, expected)


@pytest.mark.parametrize("p", [0.5, 0.3])
@pytest.mark.parametrize("shape", [(6, 20), (6, 3, 20)])
def test_per_sample_linear_kernel_equals_masked_weights(
    monkeypatch: pytest.MonkeyPatch, p: float, shape: tuple[int, ...]
) -> None:
    """The kernel's output and gradients are those of its masks (each chunk's, as
    ``group_masked_weights`` draws them from the chunk's seed) multiplied out."""
    if not kernels.fits_group_masked_linear(
        torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    ):
        pytest.skip("no kernel for per-sample linear masks here")
    layer = DropConnectLinear(20, 7, p=p, per_sample=True, max_mask_bytes=3 * 20 * 7 * 8).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 7, dtype=torch.float64)
    seeds: list[list[int]] = []
    original = kernels.group_masked_linear
    monkeypatch.setattr(
        kernels, "group_masked_linear", lambda x, w, p, s: seeds.append(s) or original(x, w, p, s)
    )
    y = layer(x)
    y.backward(upstream)
    assert len(seeds) == 1 and len(seeds[0]) == 2  # two chunks of three samples
    weight = layer.weight.detach().clone().requires_grad_()
    masked = torch.cat(
        [kernels.group_masked_weights(weight, 3, p, torch.Generator().manual_seed(seed)) for seed in seeds[0]]
    )
    expected = torch.einsum("b...i,boi->b...o", x, masked) + layer.bias
    torch.testing.assert_close(y, expected)
    grad_x, grad_weight = torch.autograd.grad(expected, (x, weight), upstream)
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(layer.weight.grad, grad_weight)


def test_per_sample_linear_kernel_chunks_follow_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernels.fits_group_masked_linear(torch.ones(1), torch.ones(1)):
        pytest.skip("no kernel for per-sample linear masks here")
    layer = DropConnectLinear(64, 32, per_sample=True, max_mask_bytes=5 * 64 * 32 * 4)  # 5 samples' weights
    sizes: list[int] = []
    original = cpu._chunks
    monkeypatch.setattr(
        cpu, "_chunks", lambda g, s: sizes.extend(c.stop - c.start for c in original(g, s)) or original(g, s)
    )
    layer(torch.randn(12, 64, requires_grad=True)).sum().backward()
    assert sizes == [4, 4, 4] * 2  # 3 equal chunks within the budget; backward draws them again


def test_gaussian_inference_moments_match_training() -> None:
    torch.manual_seed(0)
    p = 0.4
    layer = DropConnectLinear(8, 2, p=p, inference="gaussian", n_samples=1).double()
    x = torch.randn(1, 8, dtype=torch.float64).expand(20000, 8)
    with torch.no_grad():
        train = layer(x)  # per-batch mask: use per-sample for the spread
        layer.per_sample = True
        train = layer(x)
        layer.eval()
        gauss = layer(x)
    assert (train.mean(0) - gauss.mean(0)).abs().max() < 0.05 * train.std(0).max()
    torch.testing.assert_close(gauss.var(0), train.var(0), rtol=0.05, atol=1e-6)


def test_gaussian_inference_averages_the_activation() -> None:
    torch.manual_seed(0)
    layer = DropConnectLinear(8, 3, p=0.5, inference="gaussian", activation="relu", n_samples=4000)
    layer.eval()
    x = torch.randn(2, 8)
    out = layer(x)
    mean = F.linear(x, layer.weight, layer.bias)
    # E[relu(u)] >= relu(E[u]) (Jensen) and > 0 for a non-degenerate Gaussian.
    assert bool((out >= F.relu(mean) - 1e-3).all()) and bool((out > 0).all())
    layer.inference = "mean"
    assert torch.equal(layer(x), F.relu(mean))


def test_p_one_gives_bias_only_and_p_zero_is_plain() -> None:
    layer = DropConnectLinear(4, 3, p=1.0)
    x = torch.full((2, 4), float("inf"), requires_grad=True)
    y = layer(x)
    assert torch.equal(y, layer.bias.detach().expand(2, 3))
    y.sum().backward()
    assert x.grad is not None and not bool(x.grad.isnan().any())
    layer.p = 0.0
    z = torch.randn(2, 4)
    assert torch.equal(layer(z), F.linear(z, layer.weight, layer.bias))


def test_unbatched_inputs() -> None:
    assert DropConnectLinear(4, 3, per_sample=True)(torch.randn(4)).shape == (3,)
    assert DropConnectConv2d(2, 3, 3, per_sample=True)(torch.randn(2, 5, 5)).shape == (3, 3, 3)


def test_module_activation_is_a_submodule_and_names_can_change() -> None:
    layer = DropConnectLinear(4, 3, activation=nn.PReLU())
    assert any(isinstance(m, nn.PReLU) for m in layer.children())
    assert layer.eval()(torch.randn(2, 4)).shape == (2, 3)
    layer.activation = nn.Sigmoid()
    assert bool((layer(torch.randn(2, 4)) > 0).all())
    with pytest.raises(ValueError, match="inference must be one of"):
        layer.inference = "median"


def test_repr() -> None:
    layer = DropConnectLinear(4, 3, p=0.25, inference="gaussian", activation="tanh", n_samples=7)
    assert repr(layer) == (
        "DropConnectLinear(in_features=4, out_features=3, bias=True, p=0.25, per_sample=False, "
        "inference='gaussian', activation='tanh', n_samples=7)"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"p": 1.5}, ValueError, "p must be in"),
        ({"p": "x"}, TypeError, "p must be"),
        ({"per_sample": 1}, TypeError, "per_sample must be a bool"),
        ({"inference": "median"}, ValueError, "inference must be one of"),
        ({"activation": "swish2"}, ValueError, "activation must be one of"),
        ({"activation": 3}, TypeError, "activation must be"),
        ({"n_samples": 0}, ValueError, "n_samples must be"),
        ({"max_mask_bytes": 0}, ValueError, "max_mask_bytes must be"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DropConnectLinear(4, 3, **kwargs)
    with pytest.raises(error, match=match):
        DropConnectConv2d(2, 3, 3, **kwargs)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: DropConnectLinear(5, 3, per_sample=True), (0, 5)),
        (lambda: DropConnectLinear(5, 3, per_sample=True), (0, 4, 5)),
        (lambda: DropConnectConv1d(2, 3, 3, per_sample=True), (0, 2, 7)),
        (lambda: DropConnectConv2d(2, 3, 3, per_sample=True), (0, 2, 5, 5)),
        (lambda: DropConnectConv3d(2, 3, 3, per_sample=True), (0, 2, 4, 4, 4)),
    ],
)
@pytest.mark.parametrize("mask_groups", [None, 3])
def test_an_empty_batch_passes_like_torch(
    make: Callable[[], nn.Module], shape: tuple[int, ...], mask_groups: int | None
) -> None:
    """Zero samples are zero mask groups: nn.Linear / nn.Conv accept an empty batch, so must we."""
    layer = make()
    if mask_groups is not None:
        layer.per_sample, layer.mask_groups = False, mask_groups
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    plain = layer._product(x, layer.weight, layer.bias)
    assert out.shape == plain.shape and out.numel() == 0
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.weight.grad is not None and not layer.weight.grad.any()
