"""What the three monitors share: choosing the measured steps, attaching hooks only for
those steps, and resolving which layers to watch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_dropout._validation import check_positive_int
from lightning_dropout.callbacks import _dashboard
from lightning_dropout.layers import is_dropout_layer


def check_every_n_steps(value: Any) -> int | None:
    return None if value is None else check_positive_int("every_n_steps", value)


def resolve_named_layers(
    model: nn.Module, names: list[str], argument: str = "layers"
) -> dict[str, nn.Module]:
    """The modules called ``names``; unknown names raise a ValueError listing what exists.

    Raises:
        ValueError: some names are not modules of ``model``.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        known = ", ".join(repr(name) for name in modules if name) or "(none)"
        raise ValueError(f"layers names unknown modules {unknown}; the model's modules are: {known}")
    return {name: modules[name] for name in names}


def check_layer_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(name, str) for name in value):
        raise TypeError(f"layers must be a list of module names or None, got {value!r}")
    return list(value)


class StepMonitor(pl.Callback):
    """Measures every ``every_n_steps`` optimizer steps: hooks live from the measured
    batch's start to its end and are removed after it (and after fit, whatever happens).

    Subclasses set ``self.layers`` in ``setup`` and implement ``_hooks`` and ``_report``.
    """

    layers: dict[str, nn.Module]

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self._interval = 1
        self._active = False
        self._last_step = -1
        self._measuring = False
        self._handles: list[RemovableHandle] = []
        self.layers = {}

    @property
    def _name(self) -> str:
        return type(self).__name__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Trainer sets log_every_n_steps at run time (0 with barebones=True: never measure).
        self._interval = self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))
        self._last_step = -1
        self.layers = self._select_layers(pl_module)
        self._active = (
            bool(self.layers) and self._interval > 0 and _dashboard.check_loggers(trainer, self._name)
        )
        if not self.layers:
            if any(is_dropout_layer(module) for module in pl_module.modules()):
                _dashboard.warn_once(trainer, f"no-layers-{self._name}", self._no_layers_message())
            else:  # one warning for all the monitors
                _dashboard.warn_once(
                    trainer, "no-dropout", "The model has no dropout layers; the dropout monitors do nothing."
                )
        if self._active:
            _dashboard.register_charts(trainer, *self._charts())

    def _select_layers(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _no_layers_message(self) -> str:
        return f"{self._name}: none of the model's layers can be monitored."

    def _charts(self) -> tuple[str, _dashboard.Charts]:
        raise NotImplementedError

    def _hooks(self, name: str, module: nn.Module) -> list[RemovableHandle]:
        raise NotImplementedError

    def _report(self, trainer: pl.Trainer, step: int) -> None:
        raise NotImplementedError

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            _dashboard.write_layout(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Under gradient accumulation several batches share a step: measure the first.
        if not self._active or step % self._interval or step == self._last_step:
            return
        self._last_step = step
        self._measuring = True
        for name, module in self.layers.items():
            self._handles.extend(self._hooks(name, module))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._measuring:
            return
        self._measuring = False
        self._remove_hooks()
        if trainer.world_size > 1:
            self._agree_on_metrics(trainer)
        # Every rank reaches this point on the same steps with the same metrics, so
        # compute()'s collectives match.
        self._report(trainer, self._last_step)

    def _metric_sizes(self) -> dict[str, int]:
        """Sizes of the metrics created so far, by layer; monitors sizing metrics lazily
        (from the first activations a layer produces) override this and ``_create_metric``."""
        return {}

    def _create_metric(self, name: str, size: int, device: torch.device) -> None:
        raise NotImplementedError

    def _agree_on_metrics(self, trainer: pl.Trainer) -> None:
        """Give every rank the union of the ranks' metrics before their collectives.

        A rank whose forward skipped a layer on its first measured step has no metric for
        it yet; without this, the ranks would run different sequences of compute() calls.
        """
        local = self._metric_sizes()
        gathered: list[dict[str, int] | None] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, local)
        for sizes in gathered:
            for name, size in (sizes or {}).items():
                if name not in local:
                    self._create_metric(name, size, trainer.strategy.root_device)
                    local[name] = size

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
