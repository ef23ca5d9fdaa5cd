"""DropoutMixin: finding and setting dropout layers, mc_dropout and mc_predict on a LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_dropout import DropConnectLinear, Dropout2d, DropoutMixin, GaussianDropout, MCOutput


class Net(DropoutMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), Dropout2d(0.2), nn.Flatten(), nn.Dropout(0.3)
        )
        self.head = nn.Sequential(
            DropConnectLinear(4 * 16, 8, p=0.25),
            GaussianDropout(0.1),
            nn.FeatureAlphaDropout(0.1),
            nn.Linear(8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_dropout_layers_and_rates_by_qualified_name() -> None:
    model = Net()
    assert list(model.dropout_layers()) == ["encoder.2", "encoder.4", "head.0", "head.1", "head.2"]
    assert list(model.dropout_layers("head.*")) == ["head.0", "head.1", "head.2"]
    assert model.dropout_p() == {
        "encoder.2": 0.2,
        "encoder.4": 0.3,
        "head.0": 0.25,
        "head.1": 0.1,
        "head.2": 0.1,
    }
    model.set_dropout_p(0.5, "encoder.*")
    assert model.dropout_p()["encoder.2"] == 0.5 and model.dropout_p()["encoder.4"] == 0.5
    assert model.dropout_p()["head.0"] == 0.25
    model.set_dropout_p(0.05)
    assert set(model.dropout_p().values()) == {0.05}
    model.set_dropout_p(0.2, "head")  # a module's name selects every site below it
    assert [model.dropout_p()[name] for name in ("encoder.2", "head.0", "head.2")] == [0.05, 0.2, 0.2]


class Tagger(DropoutMixin, pl.LightningModule):
    """Sites that are not modules: an LSTM's between-layer dropout and a float rate."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.head_dropout = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.dropout(self.lstm(x)[0], p=self.head_dropout, training=self.training)
        return self.head(h)


def test_dropout_sites_list_what_is_not_a_module() -> None:
    model = Tagger()
    sites = model.dropout_sites()
    assert {name: site.kind for name, site in sites.items()} == {
        "head_dropout": "dropout",
        "lstm.dropout": "rnn",
    }
    assert model.dropout_layers() == {}
    model.set_dropout_p(0.1, "lstm")
    assert model.dropout_p() == {"head_dropout": 0.2, "lstm.dropout": 0.1}
    assert model.lstm.dropout == 0.1
    out = model.eval().mc_predict(torch.randn(2, 5, 4), n_samples=4, batched=False)
    assert out.variance.amax() > 0 and not model.training and not model.lstm.training


def test_bad_pattern_and_bad_p_are_refused() -> None:
    model = Net()
    with pytest.raises(ValueError, match=r"'decoder\*' matches no dropout site.*encoder\.2"):
        model.set_dropout_p(0.1, "decoder*")
    with pytest.raises(ValueError, match="p must be in"):
        model.set_dropout_p(-0.1)
    with pytest.raises(TypeError, match="p must be a float"):
        model.set_dropout_p(True)  # type: ignore[arg-type]
    assert model.dropout_p()["encoder.2"] == 0.2


def test_mc_dropout_context_restores_every_mode_after_an_exception() -> None:
    model = Net().eval()
    model.encoder[1].train()
    before = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(KeyError), model.mc_dropout():
        assert all(m.training for m in model.dropout_layers().values())
        assert not model.encoder[0].training and not model.head[3].training and not model.training
        raise KeyError
    assert {name: m.training for name, m in model.named_modules()} == before


def test_mc_predict_is_stochastic_and_leaves_batchnorm_untouched() -> None:
    model = Net()
    with torch.no_grad():
        model(torch.randn(8, 1, 4, 4))  # non-trivial running statistics
    model.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 1, 4, 4)
    out = model.mc_predict(x, n_samples=12, return_samples=True)
    assert isinstance(out, MCOutput) and out.n_samples == 12
    assert out.samples is not None and out.samples.shape == (12, 5, 3)
    assert out.variance.sum() > 0 and out.entropy is not None and out.mutual_information is not None
    assert (out.mutual_information <= out.entropy + 1e-6).all()
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    # Outside MC mode the model is deterministic again.
    assert torch.equal(model(x), model(x))


def test_mixin_needs_a_module() -> None:
    class NotAModule(DropoutMixin):
        pass

    with pytest.raises(TypeError, match=r"mixed into an nn\.Module"):
        NotAModule().dropout_layers()
