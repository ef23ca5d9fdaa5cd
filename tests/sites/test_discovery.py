"""The discovery rules, each on the smallest module that shows it."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dropout import DropConnect, DropConnectLinear, Dropout, Dropout2d, GaussianDropout
from lightning_dropout.sites import find_sites, register_dropout_module
from lightning_dropout.sites.code import class_code
from tests import _models


def kinds(model: nn.Module) -> dict[str, str]:
    return {name: site.kind for name, site in find_sites(model).items()}


def test_dropout_modules_by_type() -> None:
    net = nn.Sequential(
        Dropout(0.1),
        Dropout2d(0.1),
        GaussianDropout(0.1),
        DropConnectLinear(2, 2),
        DropConnect(nn.Linear(2, 2)),
        nn.Dropout(0.1),
        nn.Dropout3d(0.1),
        nn.AlphaDropout(0.1),
        nn.FeatureAlphaDropout(0.1),
        _models.StochasticDepth(0.1, "row"),
    )
    assert kinds(net) == {
        "0": "dropout",
        "1": "channel",
        "2": "gaussian",
        "3": "dropconnect",
        "4": "dropconnect",
        "5": "dropout",
        "6": "channel",
        "7": "alpha",
        "8": "alpha",
        "9": "drop_path",
    }
    assert all(site.is_module and site.gates == (site.module,) for site in find_sites(net).values())


def test_torchvision_stochastic_depth_when_torchvision_imports() -> None:
    try:
        from torchvision.ops import StochasticDepth
    except Exception:  # absent, or a CUDA build beside the CPU torch
        pytest.skip("torchvision does not import here; its interface is tested through tests/_models.py")
    (site,) = find_sites(nn.Sequential(StochasticDepth(0.2, "row"))).values()
    assert (site.kind, site.attribute, site.p) == ("drop_path", "p", 0.2)


def test_torch_modules_with_rate_attributes() -> None:
    net = nn.ModuleDict(
        {
            "deep": nn.GRU(4, 4, num_layers=2, dropout=0.2),
            "shallow": nn.LSTM(4, 4),  # one layer: its dropout would do nothing
            "attention": nn.MultiheadAttention(8, 2, dropout=0.1),
        }
    )
    assert kinds(net) == {"deep.dropout": "rnn", "attention.dropout": "attention"}


def test_transformer_layers_gate_their_sites_because_eval_takes_a_fused_path() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1)
    sites = find_sites(layer)
    assert set(sites) == {"self_attn.dropout", "dropout", "dropout1", "dropout2"}
    assert all(layer in site.gates for site in sites.values())


class Attention(nn.Module):
    """Every way real attention code hands over its rate."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_drop = nn.Dropout(0.1)  # timm: self.attn_drop.p if self.training else 0.
        self.attention_dropout = 0.2  # transformers: a float attribute
        self.dropout_prob = 0.3

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        a = F.scaled_dot_product_attention(q, q, q, dropout_p=self.attn_drop.p if self.training else 0.0)
        p = self.attention_dropout if self.training else 0.0  # through a local variable
        b = F.scaled_dot_product_attention(q, q, q, None, p)  # positional
        c = attention_interface(self, q, dropout=0.0 if not self.training else self.dropout_prob)
        return a + b + c


def attention_interface(module: nn.Module, q: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    return F.dropout(q, p=dropout, training=module.training)


def test_attention_rates_in_code_become_sites_gated_by_the_attention() -> None:
    attention = Attention()
    sites = find_sites(attention)
    assert kinds(attention) == {
        "attention_dropout": "attention",
        "dropout_prob": "attention",
        "attn_drop": "attention",
    }
    assert sites["attn_drop"].gates == (attention.attn_drop, attention)
    assert sites["attention_dropout"].gates == (attention,)
    assert sites["attention_dropout"].holder is attention


class Block(nn.Module):
    """A module calling dropout functions at rates of its own, written ones, and submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.dropout = nn.Dropout(0.1)  # called as a module: not a function call
        self.drop_rate = 0.2
        self.layerdrop = 0.05  # read, but not passed to a dropout function
        self.dropout_config = 0.4  # stored, never read: not a site

    def forward(self, x: torch.Tensor, p_override: float = 0.3) -> torch.Tensor:
        if self.training and torch.rand(()) < self.layerdrop:
            return x
        x = self.dropout(self.fc(x))
        x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        x = F.dropout2d(x, 0.25, self.training)
        x = F.alpha_dropout(x, p_override, self.training)
        return F.dropout(x)  # the default rate, 0.5, in training mode always


def line_of(text: str) -> int:
    lines, start = inspect.getsourcelines(Block.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_rates_read_in_code_written_rates_and_layerdrop() -> None:
    block = Block()
    sites = find_sites(block)
    assert kinds(block) == {
        "drop_rate": "dropout",
        f"dropout2d@{line_of('0.25')}": "channel",
        f"alpha_dropout@{line_of('p_override, self')}": "alpha",
        f"dropout@{line_of('F.dropout(x)')}": "dropout",
        "layerdrop": "layer_drop",
        "dropout": "dropout",
    }
    written = sites[f"dropout2d@{line_of('0.25')}"]
    assert written.p == 0.25 and not written.settable and written.gates == (block,)
    assert sites[f"alpha_dropout@{line_of('p_override, self')}"].p is None  # a forward argument
    assert sites[f"dropout@{line_of('F.dropout(x)')}"].p == 0.5


class CopiedDropPath(nn.Module):
    """A leaf module dropping at a rate of its own is a dropout module."""

    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _models.stochastic_depth(x, self.drop_prob, "row", self.training)


def test_a_leaf_dropping_at_its_own_rate_is_a_dropout_module() -> None:
    net = nn.Sequential(nn.Linear(2, 2), CopiedDropPath())
    (site,) = find_sites(net).values()
    assert (site.name, site.kind, site.attribute, site.is_module) == ("1", "drop_path", "drop_prob", True)


def test_registered_classes_are_dropout_modules() -> None:
    class Shake(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = 0.3

    register_dropout_module(Shake, "alpha", kind="drop_path")
    (site,) = find_sites(nn.Sequential(Shake())).values()
    assert (site.name, site.kind, site.p) == ("0", "drop_path", 0.3)
    with pytest.raises(TypeError, match="cls"):
        register_dropout_module(int, "p")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        register_dropout_module(Shake, "alpha", kind="shake")
    with pytest.raises(ValueError, match="attribute"):
        register_dropout_module(Shake, "not a name")


def test_code_without_source_finds_nothing_and_does_not_fail() -> None:
    namespace: dict = {"nn": nn, "F": F}
    exec(
        "class Hidden(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.p_hidden = 0.2\n"
        "    def forward(self, x):\n"
        "        return F.dropout(x, self.p_hidden, self.training)\n",
        namespace,
    )
    assert find_sites(namespace["Hidden"]()) == {}


def test_code_is_read_once_per_class() -> None:
    assert class_code(Block) is class_code(Block)
    assert class_code(nn.Linear).uses == ()  # torch's classes are known by type, not read
