"""FunctionalProbe: functional dropout calls attributed to their sites, only while open."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from lightning_dropout.sites import FunctionalProbe, find_sites


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.2)  # a module: its own F.dropout call is not this layer's
        self.dropout = 0.1
        self.activation_dropout = 0.3
        self.residual_dropout = 0.1  # the same rate as `dropout`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.drop(self.fc(x)), p=self.dropout, training=self.training)
        x = F.dropout(x, p=self.activation_dropout, training=self.training)
        x = F.dropout(x, p=self.residual_dropout, training=self.training)
        return F.dropout(x, p=self.dropout, training=False)  # not dropping: not seen


def observed(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    seen: list[tuple[str, tuple[int, ...]]] = []
    with FunctionalProbe(find_sites(model), lambda site, inp: seen.append((site.name, tuple(inp.shape)))):
        model(x)
    return seen


def test_calls_are_attributed_by_module_and_rate() -> None:
    seen = observed(nn.Sequential(Layer()), torch.randn(2, 4))
    # Equal rates share an observation; the nn.Dropout module's own call is not the layer's.
    assert seen == [
        ("0.dropout", (2, 4)),
        ("0.residual_dropout", (2, 4)),
        ("0.activation_dropout", (2, 4)),
        ("0.dropout", (2, 4)),
        ("0.residual_dropout", (2, 4)),
    ]
    assert observed(nn.Sequential(Layer()).eval(), torch.randn(2, 4)) == []


def test_the_output_is_unchanged_and_nothing_stays_installed() -> None:
    model = nn.Sequential(Layer())
    x = torch.randn(3, 4)
    torch.manual_seed(5)
    expected = model(x)
    torch.manual_seed(5)
    finished: list[torch.Tensor] = []
    with FunctionalProbe(find_sites(model), lambda site, inp: finished.append):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(finished) == 5  # every observer's finish saw an output
    probe = FunctionalProbe(find_sites(model), lambda site, inp: None)
    with pytest.raises(RuntimeError, match="boom"), probe:
        raise RuntimeError("boom")
    assert not _get_current_function_mode_stack()
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    probe.remove()  # idempotent
