"""Property tests over shapes, dtypes and p for every activation-dropping layer."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dropout.layers import channel_dropout, dropout, gaussian_dropout

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
SHAPES = st.lists(st.integers(1, 6), min_size=1, max_size=4)
PS = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, p=PS, seed=st.integers(0, 2**31), inverted=st.booleans())
def test_dropout_outputs_are_zero_or_scaled_input(
    shape: list[int], dtype: torch.dtype, p: float, seed: int, inverted: bool
) -> None:
    torch.manual_seed(seed)
    x = torch.randn(shape).to(dtype)
    y = dropout(x, p, inverted=inverted)
    assert y.shape == x.shape and y.dtype == dtype
    assert not bool(y.isnan().any())
    scale = 1 / (1 - p) if inverted and p < 1 else 1.0
    kept = y != 0
    torch.testing.assert_close(y[kept], (x[kept].double() * scale).to(dtype))
    if p == 1.0:
        assert not bool(kept.any())
    if p == 0.0:
        assert torch.equal(y, x)


@settings(max_examples=40, deadline=None)
@given(
    spatial_dims=st.integers(1, 3),
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    size=st.integers(1, 3),
    dtype=DTYPES,
    p=PS,
    seed=st.integers(0, 2**31),
)
def test_channel_dropout_keeps_or_drops_whole_channels(
    spatial_dims: int, batch: int, channels: int, size: int, dtype: torch.dtype, p: float, seed: int
) -> None:
    torch.manual_seed(seed)
    x = (torch.rand(batch, channels, *([size] * spatial_dims)) + 0.5).to(dtype)  # no zeros
    y = channel_dropout(x, p, spatial_dims=spatial_dims)
    assert y.shape == x.shape and y.dtype == dtype
    dropped = (y == 0).flatten(2)
    assert bool((dropped.all(-1) | ~dropped.any(-1)).all())


@settings(max_examples=30, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, p=PS, seed=st.integers(0, 2**31))
def test_gaussian_dropout_preserves_shape_dtype_and_finiteness(
    shape: list[int], dtype: torch.dtype, p: float, seed: int
) -> None:
    torch.manual_seed(seed)
    x = torch.randn(shape).to(dtype)
    y = gaussian_dropout(x, p)
    assert y.shape == x.shape and y.dtype == dtype and bool(y.isfinite().all())
