"""The demo's models and data: CNN dropout kinds, the tied autoencoder, the seeded split."""

from __future__ import annotations

import pytest
import torch

from lightning_dropout.demo import DigitsAutoencoder, DigitsCNN, DigitsDataModule


def test_cnn_element_dropout_drops_single_activations_spatial_whole_channels() -> None:
    x = torch.ones(4, 16, 8, 8)
    element = DigitsCNN(channels=(16, 16), p=0.5, dropout="element").net.drop1.train()
    spatial = DigitsCNN(channels=(16, 16), p=0.5, dropout="spatial").net.drop1.train()
    kept_per_channel = (element(x) != 0).flatten(2).float().mean(2)
    assert ((kept_per_channel > 0) & (kept_per_channel < 1)).any()  # channels partly dropped
    kept_per_channel = (spatial(x) != 0).flatten(2).float().mean(2)
    assert set(kept_per_channel.unique().tolist()) == {0.0, 1.0}  # each channel all or nothing


def test_cnn_refuses_an_unknown_dropout_kind() -> None:
    with pytest.raises(ValueError, match="dropout must be one of"):
        DigitsCNN(dropout="channel")


def test_cnn_without_dropout_has_no_dropout_layer() -> None:
    assert DigitsCNN(p=0.0).dropout_layers() == {}


def test_autoencoder_ties_decoder_to_encoder_and_drops_only_in_training() -> None:
    model = DigitsAutoencoder(hidden=32, p=0.5)
    assert set(dict(model.named_parameters())) == {"encoder.weight", "encoder.bias", "decoder_bias"}
    x = torch.rand(5, 64)
    model.eval()
    expected = model.hidden_units(x) @ model.encoder.weight + model.decoder_bias
    torch.testing.assert_close(model(x), expected)
    model.train()
    assert not torch.equal(model(x), expected)
    assert list(model.dropout_layers()) == ["drop"]


def test_data_split_sizes_follow_the_arguments_and_the_seed() -> None:
    data = DigitsDataModule(seed=3, train_size=500, val_size=200)
    data.setup("fit")
    assert {name: len(split) for name, split in data.splits.items()} == {
        "train": 500,
        "val": 200,
        "test": 1097,
    }
    other = DigitsDataModule(seed=4, train_size=500, val_size=200)
    other.setup("fit")
    assert not torch.equal(data.splits["test"].tensors[1], other.splits["test"].tensors[1])
    with pytest.raises(ValueError, match="must leave test samples"):
        DigitsDataModule(train_size=1500, val_size=297).setup("fit")
    with pytest.raises(ValueError, match="must be >= 1"):
        DigitsDataModule(val_size=0)
