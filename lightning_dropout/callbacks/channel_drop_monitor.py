"""ChannelDropMonitor: the realised fraction of dropped channels beside the expected p."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_dropout._deprecation import renamed_argument
from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._monitor import Removable, StepMonitor, watch_sites
from lightning_dropout.layers import ChannelDropout
from lightning_dropout.metrics import ChannelDrop
from lightning_dropout.selection import check_patterns, select
from lightning_dropout.sites import DropoutSite, find_sites

_TORCH_SPATIAL_DIMS: dict[type[nn.Module], int] = {nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3}


def channels_first(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` as ``(N, C, *spatial)``, adding the batch dimension of an unbatched input the
    way ``module`` itself reads it (torch's Dropout2d takes 3-D input as ``(N, C, L)``).
    """
    if isinstance(module, ChannelDropout):
        return module.as_batched(x)
    spatial = _TORCH_SPATIAL_DIMS.get(type(module), x.dim() - 2)
    batched = x.dim() != spatial + 1 or isinstance(module, nn.Dropout2d)
    return x if batched else x.unsqueeze(0)


def _channel_nonzero(x: Tensor) -> Tensor:
    return x.flatten(2).ne(0).any(dim=2) if x.dim() > 2 else x.ne(0)


class ChannelDropMonitor(StepMonitor):
    """Log the realised fraction of dropped channels of each channel-dropping site.

    SpatialDropout (Tompson et al., CVPR 2015) zeroes whole channels. On each measured step,
    for each channel-dropping module in training mode (this package's and torch's
    Dropout1d/2d/3d), a :class:`~lightning_dropout.metrics.ChannelDrop` counts which
    (sample, channel) pairs came out all zero although they went in nonzero, and logs
    ``channel_drop/<layer>/fraction`` beside ``channel_drop/<layer>/expected`` (the layer's
    ``p``) and the histogram ``channel_drop/<layer>/per_channel`` of per-channel drop
    frequencies. Hooks exist only during measured steps; counts are reduced over DDP ranks.

    Args:
        sites: a glob or a list of globs on qualified site names (a glob naming a module
            selects every channel-dropping module below it); None watches them all.
        every_n_steps: measure every this many optimizer steps; None uses the trainer's
            ``log_every_n_steps``.
        layers: the deprecated name of ``sites``.

    Raises:
        TypeError: wrongly typed arguments, or both ``sites`` and ``layers``.
        ValueError: ``every_n_steps`` < 1; in ``setup``, a glob in ``sites`` that matches no
            channel-dropping module (the error lists them).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ChannelDropMonitor()], logger=False)
    """

    def __init__(
        self,
        sites: str | Sequence[str] | None = None,
        every_n_steps: int | None = None,
        *,
        layers: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(every_n_steps)
        sites = renamed_argument("ChannelDropMonitor", "layers", "sites", layers, sites)
        self.site_patterns = check_patterns("sites", sites)

    def _forget_run(self) -> None:
        super()._forget_run()
        self.sites: dict[str, DropoutSite] = {}
        self._metrics: dict[str, ChannelDrop] = {}

    def _select(self, pl_module: pl.LightningModule) -> Mapping[str, object]:
        channel_sites = {
            name: site
            for name, site in find_sites(pl_module).items()
            if site.is_module and site.kind == "channel"
        }
        names = select(channel_sites, self.site_patterns, "channel-dropping module")
        self.sites = {name: channel_sites[name] for name in names}
        return self.sites

    def _nothing_message(self) -> str:
        return "ChannelDropMonitor: the model has no channel-dropping layers; nothing to monitor."

    def _charts(self) -> tuple[str, _dashboard.Charts]:
        charts = _dashboard.site_charts("channel_drop", self.sites, "fraction|expected")
        return _dashboard.CHANNEL_CATEGORY, charts

    def _attach(self) -> list[Removable]:
        return watch_sites(self.sites, self._observe)

    def _observe(self, site: DropoutSite, x: Tensor) -> Callable[[Tensor], None] | None:
        if x.dim() < 2:
            return None
        module = site.module
        # Taken before the call: an inplace layer overwrites its input.
        nonzero = _channel_nonzero(channels_first(module, x))

        def count(out: Tensor) -> None:
            dropped = ~_channel_nonzero(channels_first(module, out)) & nonzero
            if site.name not in self._metrics:
                self._create_metric(site.name, dropped.shape[1], dropped.device)
            self._metrics[site.name].update(dropped, site.p or 0.0, valid=nonzero)

        return count

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
