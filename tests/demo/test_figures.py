"""The demo's pictures: feature grids (Pillow), activation histograms and NLL curves (matplotlib)."""

from __future__ import annotations

import numpy
import torch
from PIL import Image

from lightning_dropout.demo import MnistAutoencoder
from lightning_dropout.demo.autoencoder import measure_autoencoder
from lightning_dropout.demo.figures import activation_histograms, feature_grid, nll_curves, titled_row


def test_feature_grid_scales_each_tile_by_its_own_largest_weight() -> None:
    weight = torch.zeros(4, 64)
    weight[0, 0], weight[0, 1] = 3.0, -3.0  # first tile: white then black
    weight[1, 0] = 0.001  # a tiny feature still reaches white
    pixels = numpy.asarray(feature_grid(weight, zoom=2, gap=1))
    assert pixels.shape == (2 * 17 + 1, 2 * 17 + 1)  # 2 x 2 tiles of 16 px and 1 px gaps
    assert pixels[1, 1] == 255 and pixels[1, 3] == 0 and pixels[1, 5] == 128  # +max, -max, zero
    assert pixels[1, 18] == 255 and pixels[1, 20] == 128  # the second tile, on its own scale
    assert pixels[0, :].tolist() == [255] * pixels.shape[1]  # gaps are white


def test_feature_grid_draws_28x28_tiles_and_leaves_dead_units_blank() -> None:
    weight = torch.randn(4, 784)
    pixels = numpy.asarray(
        feature_grid(weight, alive=torch.tensor([True, False, True, True]), side=28, zoom=1, gap=1)
    )
    assert pixels.shape == (2 * 29 + 1, 2 * 29 + 1)
    assert (pixels[1:29, 30:58] == 255).all()
    assert not (pixels[1:29, 1:29] == 255).all()


def test_panels_are_laid_out_side_by_side() -> None:
    row = titled_row([Image.new("L", (40, 30)), Image.new("L", (60, 50))], ["a", "b"])
    assert row.width == 40 + 60 + 3 * 16 and row.height > 50


def test_activation_histograms_have_a_row_per_autoencoder() -> None:
    model = MnistAutoencoder(hidden=16)
    results = [measure_autoencoder(name, 0, model, torch.rand(20, 784)) for name in ("a", "b")]
    assert activation_histograms(results, ["no dropout", "dropout"]).size == (1000, 720)


def test_nll_curves_draw_each_model_in_its_own_colour() -> None:
    image = numpy.asarray(nll_curves({"a": [[2.0, 1.0, 0.5]], "b": [[2.0, 1.5, 1.2], [1.9, 1.4, 1.1]]}))
    blue, orange = numpy.array([31, 119, 180]), numpy.array([255, 127, 14])  # matplotlib's C0, C1
    assert (numpy.abs(image - blue).sum(axis=2) < 30).sum() > 100
    assert (numpy.abs(image - orange).sum(axis=2) < 30).sum() > 100
