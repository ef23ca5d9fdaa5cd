"""DropPath: whole samples dropped at rate p, unbiased; the branch-skipping residual; rates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dropout import DropPath
from lightning_dropout.layers import drop_path, drop_path_rates, drop_path_residual
from tests import _models

SIGMAS = 5.0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_whole_samples_drop_at_rate_p_and_the_mean_is_kept(p: float) -> None:
    torch.manual_seed(0)
    n = 20_000
    y = drop_path(torch.ones(n, 3, 2), p)
    per_sample = y.flatten(1)
    assert torch.equal(per_sample.amax(1), per_sample.amin(1))  # all or nothing per sample
    assert set(per_sample[:, 0].unique().tolist()) <= {0.0, torch.tensor(1 / (1 - p)).item()}
    dropped = (per_sample[:, 0] == 0).double().mean().item()
    assert abs(dropped - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)
    # Each sample is 0 or 1 / (1 - p): variance p / (1 - p) around a mean of 1.
    assert abs(per_sample[:, 0].double().mean().item() - 1.0) <= SIGMAS * math.sqrt(p / (1 - p) / n)


def test_kept_samples_are_the_scaled_inputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64, 8)
    x[:, 0, 0] = 1.0
    y = drop_path(x, 0.25)
    kept = y[:, 0, 0] != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert not y[~kept].any()
    assert abs((~kept).double().mean().item() - 0.25) <= SIGMAS * math.sqrt(0.25 * 0.75 / 512)


def test_evaluation_rules_and_the_ends_of_p() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert drop_path(x, 0.3, training=False) is x
    assert drop_path(x, 0.0) is x
    torch.testing.assert_close(drop_path(x, 0.3, training=False, inverted=False), x * 0.7)
    zeros = drop_path(x, 1.0)
    zeros.sum().backward()
    assert not zeros.any() and not x.grad.any()  # type: ignore[union-attr]
    assert not drop_path(torch.full((2, 2), math.inf), 1.0).isnan().any()
    kept = drop_path(torch.ones(200, 2), 0.5, inverted=False)
    assert set(kept.unique().tolist()) == {0.0, 1.0}


def test_inputs_and_rates_are_validated() -> None:
    with pytest.raises(ValueError, match="p must be in"):
        DropPath(1.5)
    with pytest.raises(TypeError, match="p must be a float"):
        DropPath("0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch dimension"):
        drop_path(torch.tensor(1.0), 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        drop_path(torch.ones(3, dtype=torch.long), 0.5)
    assert repr(DropPath(0.1)) == "DropPath(p=0.1)"
    assert repr(DropPath(0.1, inverted=False)) == "DropPath(p=0.1, inverted=False)"


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.fc(x).tanh()


def test_the_residual_helper_computes_the_branch_for_kept_samples_only() -> None:
    torch.manual_seed(0)
    branch, x = Branch(), torch.randn(64, 6, requires_grad=True)
    layer = DropPath(0.4)
    y = layer.residual(x, branch)
    (kept_count,) = branch.batch_sizes
    full = branch.fc(x).tanh()
    # Each output row is the shortcut alone or the shortcut plus the scaled branch.
    kept = (y - x).abs().amax(1) > 0
    assert int(kept.sum()) == kept_count < 64
    reference = x + torch.where(kept[:, None], full / 0.6, 0.0)
    torch.testing.assert_close(y, reference)
    # ... with the gradients of that reference.
    grads = torch.autograd.grad(y.square().sum(), [x, branch.fc.weight])
    expected = torch.autograd.grad(reference.square().sum(), [x, branch.fc.weight])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert abs(kept_count / 64 - 0.6) <= SIGMAS * math.sqrt(0.24 / 64)


def test_the_residual_helper_at_the_ends_and_in_eval() -> None:
    branch, x = Branch(), torch.randn(8, 6)
    full = x + branch.fc(x).tanh()
    torch.testing.assert_close(drop_path_residual(x, branch, 0.0), full)
    torch.testing.assert_close(drop_path_residual(x, branch, 0.5, training=False), full)
    assert drop_path_residual(x, branch, 1.0) is x
    assert branch.batch_sizes == [8, 8]  # p = 1 never calls the branch


def test_drop_path_rates_follow_the_linear_rules() -> None:
    assert drop_path_rates(0.2, 4) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(0.2, 5, from_zero=True) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    timm = _models.import_timm()
    assert drop_path_rates(0.2, 5, from_zero=True) == pytest.approx(
        timm.layers.drop.calculate_drop_path_rates(0.2, 5)
    )
    assert drop_path_rates(0.3, 1) == [0.3] and drop_path_rates(0.3, 1, from_zero=True) == [0.0]
    with pytest.raises(ValueError, match="depth"):
        drop_path_rates(0.1, 0)


def test_drops_like_timm_drop_path() -> None:
    timm = _models.import_timm()
    torch.manual_seed(0)
    x = torch.randn(4000, 5)
    ours, theirs = DropPath(0.3)(x), timm.layers.DropPath(0.3)(x)
    for y in (ours, theirs):
        kept = y[:, 0] != 0
        torch.testing.assert_close(y[kept], x[kept] / 0.7)
        assert abs((~kept).double().mean().item() - 0.3) <= SIGMAS * math.sqrt(0.21 / 4000)
