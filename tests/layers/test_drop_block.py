"""DropBlock2d: every position dropped with probability p (border included), the dropped
regions are unions of blocks, for odd and even blocks, non-square maps and maps smaller
than the block; scaling by the kept fraction or by 1 / (1 - p)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_dropout import DropBlock2d
from lightning_dropout.layers import drop_block_2d

SIGMAS = 5.0
# (height, width, block_size): odd, even, non-square, a map smaller than the block.
GEOMETRIES = [(9, 9, 3), (8, 11, 4), (5, 12, 7), (3, 2, 7), (6, 6, 1)]


def dropped(x: torch.Tensor, **kw: object) -> torch.Tensor:
    return drop_block_2d(x, **kw) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(("h", "w", "block"), GEOMETRIES)
def test_every_position_drops_with_probability_p(h: int, w: int, block: int) -> None:
    """Channels are independent: at each position the drops over C channels are Binomial(C, p)."""
    torch.manual_seed(0)
    channels, p = 4000, 0.2
    rate = dropped(torch.ones(1, channels, h, w), p=p, block_size=block)[0].double().mean(0)
    assert ((rate - p).abs() <= SIGMAS * math.sqrt(p * (1 - p) / channels)).all(), rate


def union_of_blocks(mask: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The union of every (border-clipped) kh x kw window lying inside ``mask``: ``mask``
    itself exactly when ``mask`` is a union of such blocks (morphological opening, with
    the outside of the map counting as dropped)."""
    outside = F.pad(mask.float(), (kw - 1, kw - 1, kh - 1, kh - 1), value=1.0)
    whole_windows = -F.max_pool2d(-outside, (kh, kw), stride=1)
    return F.max_pool2d(whole_windows, (kh, kw), stride=1).bool()


@pytest.mark.parametrize(("h", "w", "block"), GEOMETRIES)
def test_dropped_regions_are_blocks(h: int, w: int, block: int) -> None:
    torch.manual_seed(1)
    kh, kw = min(block, h), min(block, w)
    for share_channels in (False, True):
        mask = dropped(torch.ones(16, 3, h, w), p=0.15, block_size=block, share_channels=share_channels)
        assert mask.shape == (16, 3, h, w)
        assert torch.equal(union_of_blocks(mask, kh, kw), mask)
        if share_channels:
            assert torch.equal(mask, mask[:, :1].expand_as(mask))
    # The check can fail: element dropout is not a union of 3 x 3 blocks.
    element = torch.rand(16, 3, 9, 9) < 0.15
    assert not torch.equal(union_of_blocks(element, 3, 3), element)


def test_interior_blocks_are_whole_squares() -> None:
    torch.manual_seed(2)
    # A rare seed on a large map: the dropped region is one 4 x 4 square (even size).
    mask = dropped(torch.ones(400, 1, 30, 30), p=0.02, block_size=4)
    checked = 0
    for m in mask[:, 0]:
        rows, cols = m.nonzero().unbind(1)
        if rows.numel() == 0 or min(rows.min(), cols.min()) == 0 or max(rows.max(), cols.max()) == 29:
            continue  # empty, or touching the border
        if int(rows.max() - rows.min()) <= 3 and int(cols.max() - cols.min()) <= 3:  # one block
            assert int(m.sum()) == 16 and int(rows.max() - rows.min()) == 3 == int(cols.max() - cols.min())
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("normalize", ["kept", "expected"])
def test_unbiased(normalize: str) -> None:
    """E[out] = x at every position: per position the mean over C channels of values in
    {0, 1 / (1 - p)} (scaling by the kept fraction moves that by far less than a sigma)."""
    torch.manual_seed(3)
    channels, p = 4000, 0.3
    x = torch.ones(1, channels, 7, 7)
    y = drop_block_2d(x, p, block_size=3, normalize=normalize)[0]
    sd = math.sqrt(p / (1 - p) / channels)
    assert ((y.double().mean(0) - 1).abs() <= SIGMAS * sd).all()
    if normalize == "kept":
        assert y.double().mean().item() == pytest.approx(1.0, abs=1e-6)  # the whole mask's mean is kept
    else:
        assert set(y.unique().tolist()) == {0.0, torch.tensor(1 / 0.7).item()}


def test_ends_of_p_evaluation_and_gradients() -> None:
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    assert drop_block_2d(x, 0.0) is x and drop_block_2d(x, 0.4, training=False) is x
    assert drop_block_2d(x, 1e-18) is x  # 1 - p rounds to 1: no block can be drawn
    zeros = drop_block_2d(x, 1.0)
    zeros.sum().backward()
    assert not zeros.any() and not x.grad.any()  # type: ignore[union-attr]
    layer = DropBlock2d(0.5, block_size=2).eval()
    assert torch.equal(layer(x), x)
    y = drop_block_2d(x, 0.3, block_size=2)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad == 0, y == 0)  # no gradient through dropped positions


def test_low_precision_inputs() -> None:
    torch.manual_seed(4)
    y = drop_block_2d(torch.ones(64, 8, 6, 6, dtype=torch.bfloat16), 0.25, block_size=2)
    assert y.dtype == torch.bfloat16
    assert abs((y == 0).double().mean().item() - 0.25) < 0.05


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="4-D"):
        DropBlock2d(0.1)(torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="block_size"):
        DropBlock2d(0.1, block_size=0)
    with pytest.raises(ValueError, match="normalize"):
        DropBlock2d(0.1, normalize="batch")
    with pytest.raises(TypeError, match="share_channels"):
        DropBlock2d(0.1, share_channels=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p must be in"):
        DropBlock2d(-0.1)
    assert repr(DropBlock2d(0.1, 5, share_channels=True, normalize="expected")) == (
        "DropBlock2d(p=0.1, block_size=5, share_channels=True, normalize='expected')"
    )
