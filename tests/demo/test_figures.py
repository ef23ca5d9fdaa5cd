"""The demo's pictures, drawn with Pillow: feature grids and histograms."""

from __future__ import annotations

import numpy
import torch
from PIL import Image

from lightning_dropout.demo.figures import feature_grid, grid_of, histogram, titled_row


def test_feature_grid_scales_each_tile_by_its_own_largest_weight() -> None:
    weight = torch.zeros(4, 64)
    weight[0, 0], weight[0, 1] = 3.0, -3.0  # first tile: white then black
    weight[1, 0] = 0.001  # a tiny feature still reaches white
    pixels = numpy.asarray(feature_grid(weight, zoom=2, gap=1))
    assert pixels.shape == (2 * 17 + 1, 2 * 17 + 1)  # 2 x 2 tiles of 16 px and 1 px gaps
    assert pixels[1, 1] == 255 and pixels[1, 3] == 0 and pixels[1, 5] == 128  # +max, -max, zero
    assert pixels[1, 18] == 255 and pixels[1, 20] == 128  # the second tile, on its own scale
    assert pixels[0, :].tolist() == [255] * pixels.shape[1]  # gaps are white


def test_feature_grid_leaves_dead_units_blank() -> None:
    weight = torch.randn(4, 64)
    pixels = numpy.asarray(feature_grid(weight, alive=torch.tensor([True, False, True, True]), zoom=1, gap=1))
    assert (pixels[1:9, 10:18] == 255).all()
    assert not (pixels[1:9, 1:9] == 255).all()


def test_histogram_draws_a_bar_per_occupied_bin() -> None:
    values = torch.cat([torch.zeros(90), torch.ones(10)])
    image = histogram(values, "title", "x", bins=2, value_range=(0.0, 1.0), size=(300, 200))
    pixels = numpy.asarray(image)
    bar = numpy.array([70, 110, 170])
    columns = (pixels == bar).all(axis=2).any(axis=0)
    heights = (pixels == bar).all(axis=2).sum(axis=0)
    assert columns.sum() > 0
    # The bar of the 90 zeros is nine times as tall as the bar of the 10 ones.
    tall, short = heights[: 64 + 108].max(), heights[64 + 108 :].max()
    assert abs(tall / short - 9) < 0.5


def test_panels_are_laid_out_side_by_side_and_in_a_grid() -> None:
    tiles = [Image.new("L", (40, 30)), Image.new("L", (60, 50))]
    row = titled_row(tiles, ["a", "b"])
    assert row.width == 40 + 60 + 3 * 16 and row.height > 50
    assert grid_of([Image.new("RGB", (10, 5))] * 3, columns=2).size == (20, 10)
