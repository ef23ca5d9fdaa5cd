"""Which modules are dropout layers, and reading/setting their rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dropout as ld
from lightning_dropout.layers import (
    get_rate,
    is_channel_dropout_layer,
    is_dropout_layer,
    rate_attribute,
    set_rate,
)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.drop_prob = drop_prob


OURS = [
    ld.Dropout(),
    ld.Dropout1d(),
    ld.Dropout2d(),
    ld.Dropout3d(),
    ld.GaussianDropout(),
    ld.DropConnectLinear(2, 2),
    ld.DropConnectConv2d(1, 1, 1),
    ld.DropConnect(nn.Linear(2, 2)),
]
TORCH = [
    nn.Dropout(),
    nn.Dropout1d(),
    nn.Dropout2d(),
    nn.Dropout3d(),
    nn.AlphaDropout(),
    nn.FeatureAlphaDropout(),
]


@pytest.mark.parametrize("module", OURS + TORCH, ids=lambda m: type(m).__name__)
def test_dropout_family(module: nn.Module) -> None:
    assert is_dropout_layer(module)
    assert rate_attribute(module) == "p"
    set_rate(module, 0.2)
    assert get_rate(module) == 0.2


def test_channel_dropout_layers() -> None:
    channel = [m for m in OURS + TORCH if is_channel_dropout_layer(m)]
    assert [type(m).__name__ for m in channel] == [
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "FeatureAlphaDropout",
    ]


def test_drop_path_and_non_dropout_modules() -> None:
    path = DropPath(0.1)
    assert not is_dropout_layer(path) and rate_attribute(path) == "drop_prob"
    set_rate(path, 0.3)
    assert path.drop_prob == 0.3
    for module in (nn.Linear(2, 2), nn.ReLU(), nn.BatchNorm1d(2)):
        assert not is_dropout_layer(module) and rate_attribute(module) is None
        with pytest.raises(TypeError, match="has no drop probability"):
            get_rate(module)
    with pytest.raises(ValueError, match="p must be in"):
        set_rate(nn.Dropout(), 1.5)


def test_layers_package_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = "import sys, lightning_dropout.layers; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_reexport_only_uses_public_names() -> None:
    assert set(ld.__all__) <= set(dir(ld))
    assert torch.equal(ld.Dropout(0.0)(torch.ones(1)), torch.ones(1))
