"""ChannelDropMonitor: the realised fraction of dropped channels beside the expected p."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._monitor import StepMonitor, check_layer_names, resolve_named_layers
from lightning_dropout.layers import get_rate, is_channel_dropout_layer
from lightning_dropout.layers.spatial import _ChannelDropout
from lightning_dropout.metrics import ChannelDrop

_TORCH_SPATIAL_DIMS: dict[type[nn.Module], int] = {nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3}


def _zero_drops(module: nn.Module) -> bool:
    """Whether ``module`` drops channels to zero (FeatureAlphaDropout sets a constant)."""
    return is_channel_dropout_layer(module) and not isinstance(module, nn.FeatureAlphaDropout)


def channels_first(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` as ``(N, C, *spatial)``, adding the batch dimension of an unbatched input the
    way ``module`` itself reads it (torch's Dropout2d takes 3-D input as ``(N, C, L)``).
    """
    if isinstance(module, _ChannelDropout):
        batched = module.batched if module.batched is not None else x.dim() == module.spatial_dims + 2
    else:
        spatial = _TORCH_SPATIAL_DIMS.get(type(module), x.dim() - 2)
        batched = x.dim() != spatial + 1 or isinstance(module, nn.Dropout2d)
    return x if batched else x.unsqueeze(0)


def _channel_nonzero(x: Tensor) -> Tensor:
    return x.flatten(2).ne(0).any(dim=2) if x.dim() > 2 else x.ne(0)


class ChannelDropMonitor(StepMonitor):
    """Log the realised fraction of dropped channels of each channel-dropping layer.

    SpatialDropout (Tompson et al., CVPR 2015) zeroes whole channels. On each measured step,
    for each channel-dropping layer in training mode (this package's and torch's
    Dropout1d/2d/3d), a :class:`~lightning_dropout.metrics.ChannelDrop` counts which
    (sample, channel) pairs came out all zero although they went in nonzero, and logs
    ``channel_drop/<layer>/fraction`` beside ``channel_drop/<layer>/expected`` (the layer's
    ``p``) and the histogram ``channel_drop/<layer>/per_channel`` of per-channel drop
    frequencies. Hooks exist only during measured steps; counts are reduced over DDP ranks.

    Args:
        layers: names of the channel-dropping layers to watch; None watches them all.
        every_n_steps: measure every this many optimizer steps; None uses the trainer's
            ``log_every_n_steps``.

    Raises:
        TypeError: wrongly typed arguments.
        ValueError: ``every_n_steps`` < 1; in ``setup``, ``layers`` names unknown modules or
            modules that do not drop channels to zero.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ChannelDropMonitor()], logger=False)
    """

    def __init__(self, layers: list[str] | None = None, every_n_steps: int | None = None) -> None:
        super().__init__(every_n_steps)
        self.layer_names = check_layer_names(layers)
        self._metrics: dict[str, ChannelDrop] = {}

    def _select_layers(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        if self.layer_names is None:
            return {name: module for name, module in pl_module.named_modules() if _zero_drops(module)}
        chosen = resolve_named_layers(pl_module, self.layer_names)
        wrong = [name for name, module in chosen.items() if not _zero_drops(module)]
        if wrong:
            raise ValueError(
                f"layers names modules that do not drop channels to zero: {wrong} "
                "(expected Dropout1d/2d/3d, this package's or torch's)"
            )
        return chosen

    def _no_layers_message(self) -> str:
        return "ChannelDropMonitor: the model has no channel-dropping layers; nothing to monitor."

    def _charts(self) -> tuple[str, _dashboard.Charts]:
        charts = {
            _dashboard.tag_prefix(name): [_dashboard.layer_regex("channel_drop", name, "fraction|expected")]
            for name in self.layers
        }
        return _dashboard.CHANNEL_CATEGORY, charts

    def _hooks(self, name: str, module: nn.Module) -> list[RemovableHandle]:
        seen: dict[str, Tensor] = {}

        def before(mod: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, Tensor) and x.dim() >= 2 and mod.training:
                with torch.no_grad():
                    # Taken before the call: an inplace layer overwrites its input.
                    seen["nonzero"] = _channel_nonzero(channels_first(mod, x))

        def after(mod: nn.Module, args: Any, output: Any) -> None:
            if "nonzero" not in seen or not isinstance(output, Tensor):
                return
            nonzero = seen.pop("nonzero")
            with torch.no_grad():
                dropped = ~_channel_nonzero(channels_first(mod, output)) & nonzero
                if name not in self._metrics:
                    self._create_metric(name, dropped.shape[1], dropped.device)
                self._metrics[name].update(dropped, get_rate(mod), valid=nonzero)

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def _metric_sizes(self) -> dict[str, int]:
        return {name: metric.num_channels for name, metric in self._metrics.items()}

    def _create_metric(self, name: str, size: int, device: torch.device) -> None:
        self._metrics[name] = ChannelDrop(size).to(device)

    def _report(self, trainer: pl.Trainer, step: int) -> None:
        scalars: dict[str, float] = {}
        for name in sorted(self._metrics):
            metric = self._metrics[name]
            if metric.update_count == 0:
                # A layer this step's forward skipped: keep every rank's compute() in step.
                metric.update(metric.observed.new_zeros(0, metric.num_channels, dtype=torch.bool), 0.0)
            stats = metric.compute()
            metric.reset()
            if stats["observed"].sum() == 0:
                continue
            prefix = f"channel_drop/{_dashboard.tag_prefix(name)}"
            scalars[f"{prefix}/fraction"] = float(stats["fraction"])
            scalars[f"{prefix}/expected"] = float(stats["expected"])
            _dashboard.log_histogram(trainer, f"{prefix}/per_channel", stats["per_channel"], step)
        _dashboard.log_scalars(trainer, scalars, step)
