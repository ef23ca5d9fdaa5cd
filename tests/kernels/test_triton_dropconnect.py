"""Per-sample DropConnect in Triton, run by the interpreter on CPU tensors (fp32).

The masks are regenerated from the same seed by ``materialize_masks`` (the mask function
the three products share, written out); the products are compared with a float64
reference built from them (to a tolerance: the summation order differs). One test reads a
mask back through the forward product itself (one-hot rows, unit weights).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import torch

pytest.importorskip("triton")

if TYPE_CHECKING:  # the fixture's type, defined beside the fixtures
    from tests.kernels.conftest import RecordingBackend

from lightning_dropout import DropConnectLinear, kernels
from lightning_dropout.kernels import triton_dropconnect as dc


def regenerated_mask(
    groups: int, out_features: int, in_features: int, p: float, seed: torch.Tensor
) -> torch.Tensor:
    return dc.materialize_masks(groups, out_features, in_features, p, seed).double()


@pytest.mark.parametrize(
    ("batch", "out_features", "in_features", "bias"),
    [(3, 5, 70, True), (2, 33, 7, False), (1, 1, 1, True), (2, 64, 128, True)],  # the last: whole tiles
)
def test_per_sample_forward_and_backward_match_float64(
    batch: int, out_features: int, in_features: int, bias: bool
) -> None:
    seed = torch.tensor(42)
    x = torch.randn(batch, in_features, requires_grad=True)
    w = torch.randn(out_features, in_features, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True) if bias else None
    y = dc.drop_connect_linear(x, w, b, 0.4, seed=seed)
    mask = regenerated_mask(batch, out_features, in_features, 0.4, seed)
    assert set(mask.unique().tolist()) <= {0.0, float(torch.tensor(1 / 0.6))}
    masked = w.detach().double()[None] * mask
    expected = torch.einsum("bi,boi->bo", x.detach().double(), masked)
    if b is not None:
        expected += b.detach().double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(batch, out_features)
    y.backward(grad)
    assert x.grad is not None and w.grad is not None
    expected_x = torch.einsum("bo,boi->bi", grad.double(), masked)
    torch.testing.assert_close(x.grad.double(), expected_x, rtol=1e-5, atol=1e-5)
    expected_w = torch.einsum("bo,bi,boi->oi", grad.double(), x.detach().double(), mask)
    torch.testing.assert_close(w.grad.double(), expected_w, rtol=1e-5, atol=1e-5)
    if b is not None:
        assert b.grad is not None
        torch.testing.assert_close(b.grad, grad.sum(0))


def test_forward_reads_back_the_materialized_mask() -> None:
    seed = torch.tensor(5)
    eye = torch.eye(6).repeat(2, 1)  # one-hot rows, 6 per group
    rows = dc.drop_connect_linear(eye, torch.ones(3, 6), None, 0.5, groups=2, seed=seed)
    assert torch.equal(rows.reshape(2, 6, 3).transpose(1, 2), dc.materialize_masks(2, 3, 6, 0.5, seed))


def test_groups_share_a_mask_and_extra_dimensions_follow_their_sample() -> None:
    seed = torch.tensor(7)
    x = torch.randn(4, 3, 9)  # (B, T, in): the T rows of a sample share its mask
    w = torch.randn(6, 9)
    y = dc.drop_connect_linear(x, w, None, 0.5, groups=2, seed=seed)
    mask = regenerated_mask(2, 6, 9, 0.5, seed)
    per_sample = mask.repeat_interleave(2, dim=0)  # samples 0, 1 -> group 0; 2, 3 -> group 1
    expected = torch.einsum("bti,boi->bto", x.double(), w.double()[None] * per_sample)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of mask groups"):
        dc.drop_connect_linear(x, w, None, 0.5, groups=3)


def test_masks_differ_per_sample_and_drop_at_rate_p() -> None:
    p, batch, out_features, in_features = 0.3, 4, 16, 64
    mask = regenerated_mask(batch, out_features, in_features, p, torch.tensor(3))
    assert all(not torch.equal(mask[0], mask[k]) for k in range(1, batch))
    n = mask.numel()
    dropped = (mask == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_rate_extremes_and_reproducibility() -> None:
    x, w = torch.randn(2, 5), torch.randn(3, 5)
    assert torch.equal(dc.drop_connect_linear(x, w, None, 1.0), torch.zeros(2, 3))
    torch.testing.assert_close(dc.drop_connect_linear(x, w, None, 0.0), x @ w.t())
    torch.manual_seed(1)
    first = dc.drop_connect_linear(x, w, None, 0.5)
    torch.manual_seed(1)
    assert torch.equal(dc.drop_connect_linear(x, w, None, 0.5), first)


def test_custom_op_registration_is_consistent() -> None:
    args = (
        torch.randn(2, 5, requires_grad=True),
        torch.randn(3, 5, requires_grad=True),
        torch.randn(3, requires_grad=True),
        torch.tensor(1),
        torch.tensor(0.25, dtype=torch.float64),
        1,
    )
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(dc._linear_op, args, test_utils=checks)


def test_layer_uses_the_kernel_for_per_sample_masks(kernels_on_cpu: None) -> None:
    layer = DropConnectLinear(5, 3, p=0.5, per_sample=True)
    x = torch.randn(4, 5)
    torch.manual_seed(2)
    through_layer = layer(x)
    torch.manual_seed(2)
    direct = dc.drop_connect_linear(x, layer.weight, layer.bias, 0.5)
    assert torch.equal(through_layer, direct)
    layer.per_sample, layer.mask_groups = False, 4  # MC replicas of one input: a row each
    torch.manual_seed(2)
    through_layer = layer(x)
    torch.manual_seed(2)
    assert torch.equal(through_layer, dc.drop_connect_linear(x, layer.weight, layer.bias, 0.5, groups=4))
    # Two rows per mask (or a sequence per sample): the layer's own path, masks built once.
    layer.mask_groups = 2
    assert kernels.fast_drop_connect_linear(x, layer.weight, layer.bias, 0.5, 2) is None
    layer.per_sample = True
    assert kernels.fast_drop_connect_linear(x[:, None].expand(4, 3, 5), layer.weight, None, 0.5, 4) is None
    torch.manual_seed(2)
    masks = layer(x[:, None].expand(4, 3, 5))
    assert torch.equal(masks, masks[:, :1].expand_as(masks))  # one mask per sample, all its rows


def test_compiled_per_sample_layer_calls_the_kernel_and_follows_p(
    kernels_on_cpu: None, recording_backend: RecordingBackend
) -> None:
    backend = recording_backend
    layer = DropConnectLinear(16, 8, p=0.0, bias=False, per_sample=True)
    compiled = torch.compile(layer, backend=backend)
    x = torch.eye(16).repeat(3, 1)  # 48 one-hot rows: each output row reads one mask column
    for p in (0.0, 0.4, 1.0):
        layer.p = p
        out = compiled(x)
        weights = layer.weight.detach().t().repeat(3, 1)
        kept = out != 0
        scale = float(torch.tensor(1 / (1 - p))) if p < 1 else 0.0
        assert torch.equal(out, torch.where(kept, weights * scale, 0.0)), p
        assert abs(kept.double().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / kept.numel())
        if p == 0.4:  # independent masks per sample: the 3 copies of each row differ
            copies = kept.reshape(3, 16, 8)
            assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    assert "lightning_dropout.triton_drop_connect_linear.default" in backend.ops
    assert backend.graphs == 1


def test_fp16_products_accumulate_in_fp32() -> None:
    seed = torch.tensor(11)
    x = torch.randn(4, 70).half().requires_grad_(True)
    w = torch.randn(9, 70).half().requires_grad_(True)
    y = dc.drop_connect_linear(x, w, None, 0.3, seed=seed)
    assert y.dtype == torch.float16
    masked = w.detach().double()[None] * regenerated_mask(4, 9, 70, 0.3, seed)
    expected = torch.einsum("bi,boi->bo", x.detach().double(), masked)
    # fp32 accumulation, one rounding to fp16: within fp16's own resolution of the result
    torch.testing.assert_close(y.double(), expected, rtol=1e-3, atol=1e-3)
    grad = torch.randn(4, 9).half()
    grad_x, grad_w = torch.autograd.grad(y, (x, w), grad)
    torch.testing.assert_close(
        grad_x.double(), torch.einsum("bo,boi->bi", grad.double(), masked), rtol=1e-3, atol=1e-3
    )
    mask = regenerated_mask(4, 9, 70, 0.3, seed)
    expected_w = torch.einsum("bo,bi,boi->oi", grad.double(), x.detach().double(), mask)
    torch.testing.assert_close(grad_w.double(), expected_w, rtol=1e-3, atol=1e-3)


def test_ties_of_the_sixteen_bit_draws_are_broken_by_a_second_draw() -> None:
    """Thresholds that share their top 16 bits differ only on entries whose 16-bit draw ties
    with them (about one in 65536): there the low 16 bits decide, from a second draw."""
    seed, high = torch.tensor(3), 0x5A5A

    def masks(low: int) -> torch.Tensor:
        p = (high * 65536 + low) / 2**32  # exact in float64: the kernels' threshold is exact
        return dc.materialize_masks(32, 128, 256, p, seed) != 0

    always, half, never = masks(0), masks(0x8000), masks(0xFFFF)
    ties = always != never  # ties keep under low 0 and drop under low 0xFFFF (unless the draw is 0xFFFF)
    entries = ties.numel()
    assert bool((always | ~never).all())  # raising the threshold only drops more
    # Poisson(entries / 65536 = 16): within 5 sigmas above, and at least one (P(0) = 1e-7)
    assert 1 <= ties.sum().item() <= entries / 65536 + 5 * math.sqrt(entries / 65536)
    assert torch.equal(half & ~ties, always & ~ties)  # off the ties nothing moves
    kept_half = half[ties].double().mean().item()
    assert 0.1 < kept_half < 0.9  # about half of the ties are kept at low = 0x8000


def test_empty_batch_and_empty_layer() -> None:
    x, w = torch.randn(0, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    out = dc.drop_connect_linear(x, w, None, 0.5)
    out.sum().backward()
    assert out.shape == (0, 3) and w.grad is not None and not w.grad.any()
    x, w = torch.randn(2, 5, requires_grad=True), torch.randn(0, 5, requires_grad=True)
    out = dc.drop_connect_linear(x, w, None, 0.5)
    out.sum().backward()
    assert out.shape == (2, 0) and x.grad is not None and not x.grad.any()
