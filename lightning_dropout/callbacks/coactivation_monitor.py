"""CoActivationMonitor: how strongly the units around each dropout site co-adapt."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import Tensor, nn

from lightning_dropout._deprecation import renamed_argument
from lightning_dropout._validation import check_bool, check_positive_int
from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._monitor import (
    Removable,
    StepMonitor,
    first_tensor,
    resolve_modules,
    watch_sites,
)
from lightning_dropout.metrics import CoActivation
from lightning_dropout.selection import check_patterns
from lightning_dropout.sites import DropoutSite, select_sites

HEATMAP_SIZE = 256
# Sites whose input is units (or channels) that a co-activation statistic describes; not
# attention probabilities, residual branches (drop-path) or token sets.
UNIT_KINDS = ("dropout", "channel", "alpha", "gaussian", "dropconnect", "drop_block")
CHANNEL_KINDS = ("channel", "drop_block")


def unit_view(acts: Tensor, channels: bool) -> Tensor:
    """``acts`` with its units along dimension 1: ``[B, C, *spatial]`` as is when reading
    channels (``channels`` or 4+ dimensions), else ``[N, D]`` with the last dimension as
    the units and every other position a sample.

    Example:
        >>> unit_view(torch.ones(2, 5, 8), channels=False).shape, unit_view(torch.ones(2, 5, 8), True).shape
        (torch.Size([10, 8]), torch.Size([2, 5, 8]))
    """
    if channels or acts.dim() >= 4:
        return acts
    return acts.reshape(-1, acts.shape[-1])


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
    """Log unit co-activation statistics around dropout sites (Srivastava et al. 2014,
    Figure 8; DeCov of Cogswell et al. 2016).

    On each measured step, for each watched activation, a
    :class:`~lightning_dropout.metrics.CoActivation` sees that step's activations and logs
    ``coactivation/<name>/{mean_abs_corr,decov,sparsity}``, the histogram
    ``coactivation/<name>/mean_activation`` and, with ``log_images``, the correlation
    heatmap image ``coactivation/<name>/corr``. Hooks exist only during measured steps.

    What is watched: by default the input of every dropout site that drops units or
    channels (the units it acts on): dropout modules, and ``F.dropout`` calls a module's
    code makes at a rate of its own (BART's ``self.dropout``, timm's ``drop_rate``); not
    attention probabilities, drop-path branches or tokens. Two arguments choose, each with
    one meaning: ``sites`` narrows the dropout sites whose inputs are measured; ``modules``
    measures the outputs of any named modules (an activation, a block) instead of the
    sites'. Given both, both are measured.

    Which dimension holds the units: channels (dimension 1) for channel-dropping sites
    and for activations with 4 or more dimensions (``[B, C, H, W]``); otherwise the last
    dimension, every other position being a sample (``[batch, tokens, hidden]`` gives
    ``batch * tokens`` samples of ``hidden`` units), so sequence lengths may vary between
    steps (dynamic padding).

    Args:
        modules: a glob or a list of globs on module names (``fnmatch`` on the whole name,
            so ``"head.1"`` is that module alone and ``"blocks.*.mlp.act"`` every block's
            activation) whose outputs to measure; None measures dropout sites.
        every_n_steps: measure every this many optimizer steps; None uses the trainer's
            ``log_every_n_steps``.
        max_units: at most this many units per activation (a fixed random subset) bound
            the cost.
        log_images: log the correlation heatmap.
        image_interval: log the heatmap on every this-many-th measured step (step 0
            included). Encoding and writing two heatmaps cost about as much as the rest of a
            measured step, so the default (10) keeps the monitors' cost near 3% of training
            while the scalars and histograms stay on every measured step; 1 logs every time.
        sites: a glob or a list of globs on qualified site names (a glob naming a module
            selects every site below it) whose inputs to measure; None for every site when
            ``modules`` is None.
        layers: the deprecated name of ``modules`` (same meaning).

    Raises:
        TypeError: wrongly typed arguments, or both ``modules`` and ``layers``.
        ValueError: ``every_n_steps`` or ``max_units`` < 1; in ``setup``, ``modules`` names
            modules the model does not have or ``sites`` matches no site (the error lists
            what there is).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[CoActivationMonitor(max_units=64)], logger=False)
    """

    def __init__(
        self,
        modules: str | Sequence[str] | None = None,
        every_n_steps: int | None = None,
        max_units: int = 256,
        log_images: bool = True,
        image_interval: int = 10,
        sites: str | Sequence[str] | None = None,
        *,
        layers: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(every_n_steps)
        modules = renamed_argument("CoActivationMonitor", "layers", "modules", layers, modules)
        self.module_patterns = check_patterns("modules", modules)
        self.site_patterns = check_patterns("sites", sites)
        self.max_units = check_positive_int("max_units", max_units)
        self.log_images = check_bool("log_images", log_images)
        self.image_interval = check_positive_int("image_interval", image_interval)

    def _forget_run(self) -> None:
        super()._forget_run()
        self._sites: dict[str, DropoutSite] = {}
        self._modules: dict[str, nn.Module] = {}
        self._metrics: dict[str, CoActivation] = {}
        self._subsets: dict[str, Tensor] = {}

    def _select(self, pl_module: pl.LightningModule) -> Mapping[str, object]:
        self._sites = {}
        if self.module_patterns is None or self.site_patterns is not None:
            chosen = select_sites(pl_module, self.site_patterns)
            self._sites = {name: site for name, site in chosen.items() if site.kind in UNIT_KINDS}
        self._modules = resolve_modules(pl_module, self.module_patterns) if self.module_patterns else {}
        return {**self._sites, **self._modules}

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

    def _attach(self) -> list[Removable]:
        handles = watch_sites(self._sites, self._observe) if self._sites else []
        for name, module in self._modules.items():
            handles.append(module.register_forward_hook(self._output_hook(name)))
        return handles

    def _observe(self, site: DropoutSite, x: Tensor) -> None:
        self._record(site.name, x, channels=site.kind in CHANNEL_KINDS)

    def _output_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            with torch.no_grad():
                self._record(name, first_tensor(output), channels=False)

        return hook

    def _record(self, name: str, acts: Tensor | None, channels: bool) -> None:
        if acts is None or acts.dim() < 2 or not acts.is_floating_point():
            return
        units = self._units(name, unit_view(acts.detach(), channels))
        self._metrics[name].update(units)

    def _units(self, name: str, acts: Tensor) -> Tensor:
        """The watched units of ``acts`` (units along dimension 1), subsetted."""
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
