"""Selecting sites by pattern, setting their rates, switching them on."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dropout.sites import dropout_layers, find_sites, select_sites, set_dropout_p, sites_training
from tests._models import conv_net


class Encoder(nn.Module):
    """Dropout in three forms: a module, a float read in forward, a written rate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.hidden_dropout = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.fc(x), p=self.hidden_dropout, training=self.training)
        return F.dropout(self.drop(x), 0.3, self.training)


def test_dropout_layers_finds_every_family_member_by_name() -> None:
    net = conv_net()
    assert list(dropout_layers(net)) == ["3", "4", "6", "7", "9", "10"]
    assert list(dropout_layers(net, "[67]")) == ["6", "7"]


def test_pattern_matching_nothing_lists_the_modules() -> None:
    with pytest.raises(ValueError, match=r"'encoder\.\*' matches no dropout module.*\['3', '4'"):
        dropout_layers(conv_net(), "encoder.*")
    with pytest.raises(TypeError, match="sites"):
        dropout_layers(conv_net(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        select_sites(conv_net(), "")


def written_line() -> int:
    lines, start = inspect.getsourcelines(Encoder.forward)
    return start + next(i for i, line in enumerate(lines) if "0.3, self.training" in line)


def test_a_pattern_naming_a_module_selects_every_site_below_it() -> None:
    net = nn.Sequential(Encoder(), nn.Dropout(0.4))
    written = f"0.dropout@{written_line()}"
    assert list(select_sites(net, "0")) == ["0.hidden_dropout", written, "0.drop"]
    assert list(dropout_layers(net, "0")) == ["0.drop"]
    assert list(select_sites(net, ["1", "0.drop"])) == ["0.drop", "1"]


def test_set_dropout_p_validates_before_changing_anything() -> None:
    net = conv_net()
    before = {n: m.p for n, m in dropout_layers(net).items()}
    with pytest.raises(ValueError, match="p must be in"):
        set_dropout_p(net, 1.5)
    with pytest.raises(TypeError, match="p must be a float"):
        set_dropout_p(net, "0.1")  # type: ignore[arg-type]
    assert {n: m.p for n, m in dropout_layers(net).items()} == before
    set_dropout_p(net, 0.1, "[34]")
    assert [m.p for m in dropout_layers(net).values()] == [0.1, 0.1, 0.2, 0.3, 0.2, 0.1]
    with pytest.raises(ValueError, match="no dropout site"):
        set_dropout_p(nn.Linear(2, 2), 0.1)


def test_set_dropout_p_sets_float_rates_and_names_the_written_ones() -> None:
    net = nn.Sequential(Encoder())
    written = f"0.dropout@{written_line()}"
    with pytest.warns(UserWarning, match=rf"rate written in code and keep it: \['{written}'\]"):
        changed = set_dropout_p(net, 0.05, "0")
    assert sorted(changed) == ["0.drop", "0.hidden_dropout"]
    assert net[0].hidden_dropout == 0.05 and net[0].drop.p == 0.05
    with pytest.raises(ValueError, match=f"no dropout site matching '{written}' whose p can be set"):
        set_dropout_p(net, 0.1, written)


def test_sites_training_sets_only_the_gates_and_restores_every_flag() -> None:
    net = nn.Sequential(nn.BatchNorm1d(4), Encoder()).eval()
    net[0].train()  # a mixed state comes back exactly
    before = {name: m.training for name, m in net.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), sites_training(net, find_sites(net)):
        assert net[1].training and net[1].drop.training
        assert not net[1].fc.training
        raise RuntimeError("boom")
    assert {name: m.training for name, m in net.named_modules()} == before


def test_set_dropout_p_leaves_a_learned_p_alone() -> None:
    from lightning_dropout import ConcreteDropout

    net = nn.Sequential(nn.Dropout(0.5), ConcreteDropout(p=0.2))
    with pytest.warns(UserWarning, match=r"learn their p and keep it: \['1'\]"):
        assert list(set_dropout_p(net, 0.1)) == ["0"]
    assert net[0].p == 0.1 and net[1].p == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no dropout site matching '1' whose p can be set"):
        set_dropout_p(net, 0.1, "1")
