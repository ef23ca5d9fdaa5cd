"""DropRateMonitor: each dropout layer's realised drop rate beside its probability ``p``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._monitor import StepMonitor
from lightning_dropout.layers import GaussianDropout, get_rate, is_dropout_layer
from lightning_dropout.layers.dropconnect import DropConnectLayer
from lightning_dropout.layers.weight_drop import DropConnect
from lightning_dropout.metrics import DropRate

# Their drops are not zeros of the output (alpha dropout sets a constant) or are not in
# the activations at all (DropConnect masks weights): only p is logged for them.
_UNOBSERVABLE = (nn.AlphaDropout, nn.FeatureAlphaDropout, DropConnectLayer, DropConnect)


def _first_tensor(args: Any) -> Tensor | None:
    value = args[0] if isinstance(args, tuple) and args else args
    return value if isinstance(value, Tensor) else None


def realised_rate(module: nn.Module, measured: float) -> float:
    """The drop rate a measurement shows: the drop fraction itself, or for Gaussian dropout
    the ``p`` whose noise variance ``p / (1 - p)`` equals the measured variance.

    Example:
        >>> realised_rate(GaussianDropout(), 1.0), realised_rate(torch.nn.Dropout(), 0.5)
        (0.5, 0.5)
    """
    return measured / (1.0 + measured) if isinstance(module, GaussianDropout) else measured


class DropRateMonitor(StepMonitor):
    """Log every dropout layer's probability and the drop rate it actually realised.

    On each measured step (every ``every_n_steps`` optimizer steps), for every
    dropout layer in training mode (this package's and torch's), logs ``dropout/<layer>/p``
    and ``dropout/<layer>/realised``: the fraction of its nonzero inputs that came out as
    zeros. For :class:`~lightning_dropout.GaussianDropout` the realised rate is the ``p``
    whose noise variance ``p / (1 - p)`` matches the measured one. Alpha dropout and
    DropConnect hide their drops from the activations, so only ``p`` is logged for them.
    Hooks exist only during measured steps. Rates are reduced over DDP ranks.

    Args:
        every_n_steps: measure every this many optimizer steps; None uses the trainer's
            ``log_every_n_steps``.

    Raises:
        TypeError: ``every_n_steps`` is not an int or None.
        ValueError: ``every_n_steps`` < 1.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[DropRateMonitor()], logger=False)
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__(every_n_steps)
        self._rates: dict[str, DropRate] = {}
        self._p_used: dict[str, float] = {}  # the p of the measured forward, not a later one

    def _select_layers(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        return {name: module for name, module in pl_module.named_modules() if is_dropout_layer(module)}

    def _charts(self) -> tuple[str, _dashboard.Charts]:
        charts = {
            _dashboard.tag_prefix(name): [_dashboard.layer_regex("dropout", name, "p|realised")]
            for name in self.layers
        }
        return _dashboard.RATE_CATEGORY, charts

    def _hooks(self, name: str, module: nn.Module) -> list[RemovableHandle]:
        if isinstance(module, _UNOBSERVABLE):
            return []
        if name not in self._rates:
            self._rates[name] = DropRate()
        rate = self._rates[name]
        # An empty update: a layer skipped by this step's forward still computes (NaN, not
        # logged) on every rank, so the ranks' collectives stay in step.
        rate.update(0, 0)
        gaussian = isinstance(module, GaussianDropout)
        seen: dict[str, Tensor] = {}

        def before(mod: nn.Module, args: Any) -> None:
            x = _first_tensor(args)
            if x is None or not mod.training:
                return
            with torch.no_grad():
                # Counted before the call: an inplace layer overwrites its input.
                seen["zeros"] = x.eq(0).sum()
                seen["x"] = x

        def after(mod: nn.Module, args: Any, output: Any) -> None:
            if "x" not in seen or not isinstance(output, Tensor):
                return
            x = seen.pop("x")
            zeros_in = seen.pop("zeros")
            self._p_used[name] = get_rate(mod)
            with torch.no_grad():
                nonzero = x.numel() - zeros_in
                if gaussian:
                    ratio = torch.where(x != 0, output / torch.where(x != 0, x, 1), 1)
                    value = (ratio - 1).square().sum()
                else:
                    value = output.eq(0).sum() - zeros_in
                if rate.device != x.device:
                    rate.to(x.device)
                rate.update(value, nonzero)

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def _report(self, trainer: pl.Trainer, step: int) -> None:
        scalars: dict[str, float] = {}
        for name, module in self.layers.items():
            prefix = f"dropout/{_dashboard.tag_prefix(name)}"
            scalars[f"{prefix}/p"] = self._p_used.get(name, get_rate(module))
        for name in sorted(self._rates):
            metric = self._rates[name]
            value = float(metric.compute())  # a DDP reduction: every rank runs it
            metric.reset()
            value = realised_rate(self.layers[name], value)
            if value == value:  # all inputs zero: nothing realised to report
                scalars[f"dropout/{_dashboard.tag_prefix(name)}/realised"] = value
        self._p_used.clear()
        _dashboard.log_scalars(trainer, scalars, step)
