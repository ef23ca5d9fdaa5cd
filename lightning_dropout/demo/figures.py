"""The demo's pictures: feature grids (Figure 7, Pillow), activation histograms (Figure 8)
and test-NLL curves (matplotlib, which comes with the demo extra)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

if TYPE_CHECKING:
    from lightning_dropout.demo.autoencoder import AutoencoderResult

BACKGROUND = 255
INK = 0
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def font(size: int) -> Font:
    """Pillow's bundled font at ``size`` pixels (its fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def feature_grid(
    weight: Tensor, alive: Tensor | None = None, side: int = 8, zoom: int = 4, gap: int = 2
) -> Image.Image:
    """Each row of ``weight`` (one unit's input weights) as a ``side x side`` tile, in a square grid.

    Each tile is scaled by its own largest |weight|: mid-grey is 0, white the largest
    positive and black the largest negative weight, as in Srivastava et al.'s Figure 7.
    Units where ``alive`` is False (units that never fire) are left blank.

    Example:
        >>> feature_grid(torch.randn(256, 64)).size
        (546, 546)
        >>> feature_grid(torch.randn(100, 784), side=28, zoom=2).size
        (582, 582)
    """
    units = weight.shape[0]
    columns = math.ceil(math.sqrt(units))
    rows = math.ceil(units / columns)
    tiles = weight.detach().float().cpu().reshape(units, side, side)
    scale = tiles.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    tiles = (tiles / scale * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    if alive is not None:
        tiles[~alive.cpu()] = BACKGROUND
    tiles = tiles.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    cell = side * zoom + gap
    canvas = torch.full((rows * cell + gap, columns * cell + gap), BACKGROUND, dtype=torch.uint8)
    for unit in range(units):
        top, left = divmod(unit, columns)
        canvas[gap + top * cell : (top + 1) * cell, gap + left * cell : (left + 1) * cell] = tiles[unit]
    return Image.fromarray(canvas.numpy(), mode="L")


def titled_row(images: Sequence[Image.Image], titles: Sequence[str], size: int = 18) -> Image.Image:
    """``images`` side by side on white, each under its title.

    Example:
        >>> titled_row([Image.new("L", (40, 30)), Image.new("L", (40, 30))], ["a", "b"]).mode
        'RGB'
    """
    text = font(size)
    margin, head = 16, size + 16
    width = sum(image.width for image in images) + margin * (len(images) + 1)
    height = max(image.height for image in images) + head + margin
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left = margin
    for image, title in zip(images, titles, strict=True):
        draw.text(
            (left + image.width / 2, margin // 2 + size / 2), title, fill="black", font=text, anchor="mm"
        )
        canvas.paste(image.convert("RGB"), (left, head))
        left += image.width + margin
    return canvas


def _png(figure: Figure) -> Image.Image:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def activation_histograms(results: Sequence[AutoencoderResult], titles: Sequence[str]) -> Image.Image:
    """Figure 8: per autoencoder (a row each), the histogram of its units' mean activations
    and of all its activations on held-out digits, on shared axes, the mean marked.

    Example:
        >>> from lightning_dropout.demo import MnistAutoencoder
        >>> from lightning_dropout.demo.autoencoder import measure_autoencoder
        >>> result = measure_autoencoder("ae", 0, MnistAutoencoder(hidden=8), torch.rand(20, 784))
        >>> activation_histograms([result], ["no dropout"]).size
        (1000, 360)
    """
    figure = Figure(figsize=(10, 3.6 * len(results)), dpi=100, layout="constrained")
    axes = figure.subplots(len(results), 2, squeeze=False)
    top_mean = max(float(r.mean_activations.max()) for r in results) or 1.0
    top_act = max(float(r.activations.max()) for r in results) or 1.0
    for row, (result, title) in zip(axes, zip(results, titles, strict=True), strict=True):
        panels = (
            (result.mean_activations, top_mean, "mean activation of each unit", "units"),
            (result.activations, top_act, "activation (every unit, every digit)", "count"),
        )
        for axis, (values, top, xlabel, ylabel) in zip(row, panels, strict=True):
            axis.hist(values.numpy(), bins=40, range=(0.0, top), color="#4a6fa5")
            mean = float(values.mean())
            axis.axvline(mean, color="#c0392b", linewidth=2)
            axis.text(
                mean,
                0.95,
                f" mean {mean:.2f}",
                color="#c0392b",
                transform=axis.get_xaxis_transform(),
                va="top",
            )
            axis.set(title=f"{title}: {xlabel.split(' (')[0]}", xlabel=xlabel, ylabel=ylabel)
    return _png(figure)


def nll_curves(curves: dict[str, list[list[float]]]) -> Image.Image:
    """Test NLL over epochs: one colour per model, a thin line per seed and a thick mean.

    Args:
        curves: model name -> one curve (a value per epoch) per seed.

    Example:
        >>> nll_curves({"a": [[1.0, 0.5], [0.9, 0.6]], "b": [[1.1, 0.4]]}).size
        (900, 500)
    """
    figure = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    axis = figure.subplots()
    for index, (name, seeds) in enumerate(curves.items()):
        colour = f"C{index}"
        for curve in seeds:
            axis.plot(range(1, len(curve) + 1), curve, color=colour, alpha=0.3, linewidth=0.8)
        mean = torch.tensor(seeds).mean(0)
        axis.plot(range(1, len(mean) + 1), mean.numpy(), color=colour, linewidth=2.5, label=f"{name} (mean)")
    axis.set(xlabel="epoch", ylabel="test NLL (nats)", title="Test NLL over training, each seed and the mean")
    axis.grid(alpha=0.3)
    axis.legend()
    return _png(figure)
