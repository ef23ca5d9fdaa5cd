"""CoActivationMonitor: how strongly the units around each dropout layer co-adapt."""

from __future__ import annotations

import io
import zlib
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dropout._validation import check_bool, check_positive_int
from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._monitor import StepMonitor, check_layer_names, resolve_named_layers
from lightning_dropout.layers import is_dropout_layer
from lightning_dropout.metrics import CoActivation

HEATMAP_SIZE = 256


def _diverging_palette(levels: int) -> list[int]:
    values = torch.linspace(-1, 1, levels)
    rgb = torch.stack([1 - (-values).clamp_min(0), 1 - values.abs(), 1 - values.clamp_min(0)], dim=1)
    return rgb.mul(255).round().to(torch.uint8).flatten().tolist()


PALETTE_LEVELS = 65  # odd: 0 has its own colour, white
PALETTE = _diverging_palette(PALETTE_LEVELS)


def correlation_png(corr: Tensor) -> tuple[bytes, int]:
    """A PNG heatmap of a correlation matrix and its side in pixels: red +1, white 0,
    blue -1, upscaled (nearest) to about 256 pixels so small matrices stay sharp.

    A 65-colour palette image with fast compression: a third of the bytes of RGB and a
    fraction of ``add_image``'s encoding time.

    Example:
        >>> png, side = correlation_png(torch.eye(2))
        >>> png[1:4], side
        (b'PNG', 256)
    """
    levels = (corr.detach().float().cpu().clamp(-1, 1) + 1) * ((PALETTE_LEVELS - 1) / 2)
    index = levels.round().to(torch.uint8)
    factor = max(1, HEATMAP_SIZE // index.shape[0])
    if factor > 1:
        index = index.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)
    side = index.shape[0]
    image = Image.frombytes("P", (side, side), index.numpy().tobytes())
    image.putpalette(PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), side


def _subset_generator(name: str) -> torch.Generator:
    # A private generator: the subset is fixed per layer name and drawing it leaves the
    # global RNG (and so the training's dropout masks) untouched.
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


class CoActivationMonitor(StepMonitor):
    """Log unit co-activation statistics around dropout layers (Srivastava et al. 2014,
    Figure 8; DeCov of Cogswell et al. 2016).

    On each measured step, for each watched layer, a :class:`~lightning_dropout.metrics.CoActivation`
    sees that step's activations and logs ``coactivation/<layer>/{mean_abs_corr,decov,sparsity}``,
    the histogram ``coactivation/<layer>/mean_activation`` and, with ``log_images``, the
    correlation heatmap image ``coactivation/<layer>/corr``. Activations ``[B, D]`` are
    units; ``[B, C, ...]`` are reduced per channel. Hooks exist only during measured steps.

    Args:
        layers: names of modules whose outputs to measure; None measures the input of
            every dropout layer (the units it acts on).
        every_n_steps: measure every this many optimizer steps; None uses the trainer's
            ``log_every_n_steps``.
        max_units: at most this many units per layer (a fixed random subset) bound the cost.
        log_images: log the correlation heatmap.
        image_interval: log the heatmap on every this-many-th measured step (step 0
            included). Encoding and writing two heatmaps cost about as much as the rest of a
            measured step, so the default (10) keeps the monitors' cost near 3% of training
            while the scalars and histograms stay on every measured step; 1 logs every time.

    Raises:
        TypeError: wrongly typed arguments.
        ValueError: ``every_n_steps`` or ``max_units`` < 1; in ``setup``, ``layers`` names
            modules the model does not have (the error lists those it has).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[CoActivationMonitor(max_units=64)], logger=False)
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int | None = None,
        max_units: int = 256,
        log_images: bool = True,
        image_interval: int = 10,
    ) -> None:
        super().__init__(every_n_steps)
        self.layer_names = check_layer_names(layers)
        self.max_units = check_positive_int("max_units", max_units)
        self.log_images = check_bool("log_images", log_images)
        self.image_interval = check_positive_int("image_interval", image_interval)
        self._metrics: dict[str, CoActivation] = {}
        self._subsets: dict[str, Tensor] = {}

    def _select_layers(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        if self.layer_names is not None:
            return resolve_named_layers(pl_module, self.layer_names)
        return {name: module for name, module in pl_module.named_modules() if is_dropout_layer(module)}

    def _charts(self) -> tuple[str, _dashboard.Charts]:
        charts = {
            f"{title}, all layers": [f"coactivation/.*/{leaf}$"]
            for title, leaf in (
                ("mean |correlation|", "mean_abs_corr"),
                ("DeCov", "decov"),
                ("sparsity", "sparsity"),
            )
        }
        return _dashboard.COACTIVATION_CATEGORY, charts

    def _units(self, name: str, acts: Tensor) -> Tensor:
        """The watched units of ``acts``: dimension 1 (features or channels), subsetted."""
        if name not in self._subsets:
            count = acts.shape[1]
            if count > self.max_units:
                chosen = torch.randperm(count, generator=_subset_generator(name))[: self.max_units]
                self._subsets[name] = chosen.sort().values
            else:
                self._subsets[name] = torch.arange(count)
            if name not in self._metrics:  # another rank may have sized it already
                self._create_metric(name, len(self._subsets[name]), acts.device)
        subset = self._subsets[name]
        if len(subset) == acts.shape[1]:
            return acts
        return acts.index_select(1, subset.to(acts.device))

    def _metric_sizes(self) -> dict[str, int]:
        return {name: metric.num_units for name, metric in self._metrics.items()}

    def _create_metric(self, name: str, size: int, device: torch.device) -> None:
        self._metrics[name] = CoActivation(size).to(device)

    def _record(self, name: str, acts: Any) -> None:
        if isinstance(acts, Tensor) and acts.dim() >= 2 and acts.is_floating_point():
            with torch.no_grad():
                units = self._units(name, acts.detach())
                self._metrics[name].update(units)

    def _hooks(self, name: str, module: nn.Module) -> list[RemovableHandle]:
        if self.layer_names is not None:
            return [module.register_forward_hook(lambda _m, _a, out: self._record(name, out))]
        return [
            module.register_forward_pre_hook(lambda _m, args: self._record(name, args[0] if args else None))
        ]

    def _report(self, trainer: pl.Trainer, step: int) -> None:
        scalars: dict[str, float] = {}
        # A function of the step, not a counter: a resumed run keeps the same cadence.
        with_images = self.log_images and (step // self._interval) % self.image_interval == 0
        for name in sorted(self._metrics):
            metric = self._metrics[name]
            if metric.update_count == 0:
                # A layer this step's forward skipped: an empty update keeps every rank's
                # compute() (a collective) in step; nothing is logged for it.
                metric.update(metric.total.new_zeros(0, metric.num_units))
            stats = metric.compute()
            metric.reset()
            if stats["num_samples"] == 0:
                continue
            prefix = f"coactivation/{_dashboard.tag_prefix(name)}"
            for key in ("mean_abs_corr", "decov", "sparsity"):
                scalars[f"{prefix}/{key}"] = float(stats[key])
            _dashboard.log_histogram(trainer, f"{prefix}/mean_activation", stats["mean_activation"], step)
            if with_images:
                png, side = correlation_png(stats["corr"])
                _dashboard.log_png(trainer, f"{prefix}/corr", png, side, side, step)
        _dashboard.log_scalars(trainer, scalars, step)
