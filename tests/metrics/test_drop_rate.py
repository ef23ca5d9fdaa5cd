from __future__ import annotations

import math

import pytest
import torch

from lightning_dropout.metrics import DropRate


def test_drop_rate_is_the_ratio_of_sums() -> None:
    rate = DropRate()
    rate.update(torch.tensor(3), 10)
    rate.update(torch.tensor([1, 1]), torch.tensor([5, 5]))
    assert rate.compute().item() == pytest.approx(5 / 20)
    empty = DropRate()
    empty.update(0, 0)
    assert math.isnan(empty.compute().item())
