"""Which modules are dropout layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dropout as ld
from lightning_dropout.layers import is_dropout_layer
from lightning_dropout.sites import find_sites

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
def test_dropout_family_are_dropout_modules_with_p(module: nn.Module) -> None:
    assert is_dropout_layer(module)
    (site,) = find_sites(nn.Sequential(module)).values()
    assert site.is_module and site.attribute == "p"
    site.set_p(0.2)
    assert module.p == 0.2
    with pytest.raises(ValueError, match="p must be in"):
        site.set_p(1.5)


def test_other_modules_are_not_dropout_layers() -> None:
    for module in (nn.Linear(2, 2), nn.ReLU(), nn.BatchNorm1d(2), nn.LSTM(2, 2, num_layers=2, dropout=0.1)):
        assert not is_dropout_layer(module)


def test_layers_package_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = "import sys, lightning_dropout.layers; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_reexport_only_uses_public_names() -> None:
    assert set(ld.__all__) <= set(dir(ld))
    assert torch.equal(ld.Dropout(0.0)(torch.ones(1)), torch.ones(1))
