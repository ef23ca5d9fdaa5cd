from __future__ import annotations

import math

import pytest
import torch

from lightning_dropout.metrics import ChannelDrop

SIGMAS = 4.0


def test_counts_match_the_masks_streamed() -> None:
    masks = [torch.rand(32, 8) < 0.3 for _ in range(5)]
    metric = ChannelDrop(8)
    for mask in masks:
        metric.update(mask, p=0.3)
    out = metric.compute()
    total = torch.cat(masks).double()
    torch.testing.assert_close(out["drop_count"], total.sum(0))
    torch.testing.assert_close(out["per_channel"], total.mean(0))
    assert out["fraction"].item() == pytest.approx(total.mean().item())
    assert out["expected"].item() == pytest.approx(0.3)
    n = total.numel()
    assert out["z_score"].item() == pytest.approx((total.sum().item() - 0.3 * n) / math.sqrt(0.21 * n))


def test_binomial_check_accepts_the_right_p_and_rejects_a_wrong_one() -> None:
    masks = torch.rand(4000, 16) < 0.3  # 64000 draws: sd of the fraction 0.0018
    right, wrong = ChannelDrop(16, tolerance_sigmas=SIGMAS), ChannelDrop(16, tolerance_sigmas=SIGMAS)
    right.update(masks, p=0.3)
    wrong.update(masks, p=0.35)  # 28 sd away
    assert bool(right.compute()["consistent"])
    assert abs(right.compute()["z_score"].item()) <= SIGMAS
    assert not bool(wrong.compute()["consistent"])


def test_changing_p_and_invalid_entries() -> None:
    metric = ChannelDrop(2)
    valid = torch.tensor([[True, True], [False, True]])
    metric.update(torch.tensor([[True, False], [True, True]]), p=0.5, valid=valid)
    metric.update(torch.tensor([[False, False]]), p=0.0)
    out = metric.compute()
    assert out["observed"].tolist() == [2.0, 3.0]
    assert out["drop_count"].tolist() == [1.0, 1.0]
    assert out["expected"].item() == pytest.approx((0.5 * 3) / 5)


def test_channel_drop_errors() -> None:
    with pytest.raises(ValueError, match=r"dropped must have shape \[N, 3\]"):
        ChannelDrop(3).update(torch.zeros(2, 4, dtype=torch.bool), p=0.5)
    with pytest.raises(ValueError, match="p must be"):
        ChannelDrop(3).update(torch.zeros(2, 3, dtype=torch.bool), p=1.5)
    with pytest.raises(ValueError, match="tolerance_sigmas"):
        ChannelDrop(3, tolerance_sigmas=0.0)
