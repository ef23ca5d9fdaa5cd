"""Pictures drawn with Pillow alone: feature grids (Figure 7) and histograms (Figure 8)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND = 255
INK = 0
BAR = (70, 110, 170)
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


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    power = 10 ** math.floor(math.log10(raw))
    return next(power * m for m in (1, 2, 2.5, 5, 10) if power * m >= raw)


def histogram(
    values: Tensor,
    title: str,
    xlabel: str,
    bins: int = 30,
    value_range: tuple[float, float] | None = None,
    size: tuple[int, int] = (480, 320),
) -> Image.Image:
    """A bar histogram of ``values`` with axes, ticks, a title and the mean marked.

    Args:
        values: the numbers to count (any shape).
        title: drawn above the plot.
        xlabel: drawn under the x axis.
        bins: number of equal-width bins.
        value_range: the x range; default the values' own range.
        size: width and height in pixels.

    Example:
        >>> histogram(torch.rand(100), "uniform", "value").size
        (480, 320)
    """
    data = values.detach().flatten().double().cpu()
    low, high = value_range if value_range is not None else (float(data.min()), float(data.max()))
    if high <= low:
        high = low + 1.0
    counts = torch.histc(data.clamp(low, high), bins=bins, min=low, max=high)
    width, height = size
    left, right, top, bottom = 64, 20, 40, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    small, label = font(12), font(14)
    draw.text((width / 2, 16), title, fill="black", font=label, anchor="mm")
    peak = float(counts.max()) or 1.0
    y_step = _nice_step(peak, 4)
    y_top = math.ceil(peak / y_step) * y_step

    def x_at(value: float) -> float:
        return left + (value - low) / (high - low) * plot_w

    def y_at(count: float) -> float:
        return top + plot_h - count / y_top * plot_h

    bar = plot_w / bins
    for i, count in enumerate(counts.tolist()):
        if count > 0:
            draw.rectangle([left + i * bar, y_at(count), left + (i + 1) * bar - 1, top + plot_h], fill=BAR)
    draw.line([left, top, left, top + plot_h, left + plot_w, top + plot_h], fill="black")
    y = 0.0
    while y <= y_top + 1e-9:
        draw.line([left - 4, y_at(y), left, y_at(y)], fill="black")
        draw.text((left - 6, y_at(y)), f"{y:g}", fill="black", font=small, anchor="rm")
        y += y_step
    x_step = _nice_step(high - low, 5)
    x = math.ceil(low / x_step) * x_step
    while x <= high + 1e-9:
        draw.line([x_at(x), top + plot_h, x_at(x), top + plot_h + 4], fill="black")
        draw.text((x_at(x), top + plot_h + 6), f"{x:g}", fill="black", font=small, anchor="ma")
        x += x_step
    draw.text((left + plot_w / 2, height - 12), xlabel, fill="black", font=label, anchor="mm")
    draw.text((left, top - 6), "count", fill="black", font=small, anchor="rb")
    mean = float(data.mean())
    if low <= mean <= high:
        draw.line([x_at(mean), top, x_at(mean), top + plot_h], fill=(200, 40, 40), width=2)
        draw.text((x_at(mean) + 4, top + 2), f"mean {mean:.2f}", fill=(200, 40, 40), font=small, anchor="la")
    return canvas


def grid_of(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Equal-sized ``images`` tiled row by row on white.

    Example:
        >>> grid_of([Image.new("RGB", (10, 5))] * 4, columns=2).size
        (20, 10)
    """
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (width * columns, height * rows), "white")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * width, (i // columns) * height))
    return canvas
