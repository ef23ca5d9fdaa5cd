"""Channel dropout (SpatialDropout): whole channels, shapes, ambiguity, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dropout import Dropout1d, Dropout2d, Dropout3d
from lightning_dropout.layers import channel_dropout


def _channels_are_whole(y: torch.Tensor, batched: bool = True) -> bool:
    flat = y.flatten(2 if batched else 1)
    return bool((flat.amax(-1) == flat.amin(-1)).all())


def test_slides_example_dropout2d_zeroes_channels_and_scales_by_two() -> None:
    y = Dropout2d()(torch.ones(2, 3, 2, 4))
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert _channels_are_whole(y)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [(Dropout1d, (4, 6, 9)), (Dropout2d, (4, 6, 3, 5)), (Dropout3d, (4, 6, 2, 3, 4))],
)
def test_batched_inputs_drop_whole_channels_per_sample(layer: type, shape: tuple[int, ...]) -> None:
    y = layer(0.5)(torch.ones(shape))
    assert y.shape == shape
    assert _channels_are_whole(y)
    # Masks differ between samples: with 4 x 6 draws the chance of all-equal rows is tiny.
    per_sample = y.flatten(2)[:, :, 0]
    assert not all(torch.equal(per_sample[0], row) for row in per_sample[1:])


@pytest.mark.parametrize(("layer", "shape"), [(Dropout1d, (6, 9)), (Dropout3d, (6, 2, 3, 4))])
def test_unbatched_inputs_are_channel_first(layer: type, shape: tuple[int, ...]) -> None:
    y = layer(0.5)(torch.ones(shape))
    assert y.shape == shape
    assert _channels_are_whole(y, batched=False)


def test_dropout2d_3d_input_is_ambiguous_unless_told() -> None:
    with pytest.raises(ValueError, match="ambiguous.*Dropout1d.*batched=False"):
        Dropout2d()(torch.ones(2, 3, 4))
    y = Dropout2d(batched=False)(torch.ones(3, 4, 5))
    assert _channels_are_whole(y, batched=False)


def test_wrong_dimensions_and_contradicting_batched_flag_raise() -> None:
    with pytest.raises(ValueError, match=r"Dropout2d expects a 4-D batched input"):
        Dropout2d()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="batched=True"):
        Dropout2d(batched=True)(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="spatial_dims"):
        channel_dropout(torch.ones(2, 3, 4), spatial_dims=4)
    with pytest.raises(TypeError, match="batched"):
        Dropout2d(batched="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("p", [0.2, 0.5, 0.7])
def test_channel_keep_rate_within_five_sigma(p: float) -> None:
    n, c = 2000, 100
    y = Dropout2d(p)(torch.ones(n, c, 2, 2))
    kept = float((y[:, :, 0, 0] != 0).float().mean())
    sigma = math.sqrt(p * (1 - p) / (n * c))
    assert abs(kept - (1 - p)) < 5 * sigma


@pytest.mark.parametrize("inverted", [True, False])
def test_unbiased(inverted: bool) -> None:
    p, draws = 0.4, 3000
    layer = Dropout1d(p, inverted=inverted)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    mean = torch.stack([layer(x) for _ in range(draws)]).mean(0)
    expected = layer.eval()(x)
    scale = 1 / (1 - p) if inverted else 1.0
    sigma = (x.abs() * scale * math.sqrt(p * (1 - p) / draws)).clamp_min(1e-12)
    assert bool(((mean - expected).abs() < 5 * sigma).all())


def test_gradcheck_with_fixed_mask() -> None:
    layer = Dropout3d(0.5)

    def fixed_mask(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(5)
        return layer(x)

    x = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fixed_mask, (x,))


def test_p_one_zeros_p_zero_and_eval_identity() -> None:
    x = torch.full((2, 3, 4, 4), float("inf"), requires_grad=True)
    y = Dropout2d(1.0)(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    z = torch.randn(2, 3, 4, 4)
    assert Dropout2d(0.0)(z) is z
    assert Dropout2d(0.5).eval()(z) is z


def test_inplace_and_repr() -> None:
    x = torch.ones(3, 4, 5)
    Dropout1d(0.5, inplace=True)(x)
    assert set(x.unique().tolist()) <= {0.0, 2.0}
    assert (
        repr(Dropout2d(0.3, batched=False)) == "Dropout2d(p=0.3, inplace=False, inverted=True, batched=False)"
    )
