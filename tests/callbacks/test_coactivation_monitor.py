from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dropout import Dropout
from lightning_dropout.callbacks import CoActivationMonitor
from lightning_dropout.callbacks.coactivation_monitor import correlation_png


def test_measures_a_fixed_subset_of_the_dropout_layers_input() -> None:
    monitor, model = CoActivationMonitor(max_units=5), torch.nn.Sequential(Dropout(0.5))
    monitor._select(model)
    x = torch.randn(50, 20, dtype=torch.float64)
    for _ in range(2):  # the subset stays the same from step to step
        handles = monitor._attach()
        model(x)
        for handle in handles:
            handle.remove()
    subset = monitor._subsets["0"]
    assert len(subset) == 5
    out = monitor._metrics["0"].compute()
    expected = np.corrcoef(x[:, subset].numpy(), rowvar=False)  # the input, not the dropped output
    np.testing.assert_allclose(out["corr"].numpy(), expected, atol=1e-9)


def test_correlation_heatmap_colours() -> None:
    png, side = correlation_png(torch.tensor([[1.0, -1.0], [-1.0, 0.0]]))
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert side == 256 and image.size == (256, 256)
    assert image.getpixel((0, 0)) == (255, 0, 0)  # +1: red
    assert image.getpixel((255, 0)) == (0, 0, 255)  # -1: blue
    assert image.getpixel((255, 255)) == (255, 255, 255)  # 0: white


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="max_units"):
        CoActivationMonitor(max_units=0)
    with pytest.raises(TypeError, match="log_images"):
        CoActivationMonitor(log_images="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="every_n_steps"):
        CoActivationMonitor(every_n_steps=2.5)  # type: ignore[arg-type]
