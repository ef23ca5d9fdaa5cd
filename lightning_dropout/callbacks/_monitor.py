"""What the three monitors share: choosing the measured steps, attaching hooks only for
those steps, watching dropout sites, and resolving which modules to watch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from typing_extensions import override

from lightning_dropout._validation import check_positive_int
from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._run import DropoutCallback, warn_once
from lightning_dropout.callbacks._site_report import report_sites
from lightning_dropout.sites import DropoutSite, FunctionalProbe, find_sites
from lightning_dropout.sites.probe import Observer


class Removable(Protocol):
    def remove(self) -> None: ...


def check_every_n_steps(value: Any) -> int | None:
    return None if value is None else check_positive_int("every_n_steps", value)


def first_tensor(value: Any) -> Tensor | None:
    """The tensor, or the first item of a tuple when that is a tensor (hook arguments,
    outputs such as timm's ``PatchDropoutWithIndices``); a ``PackedSequence``'s data."""
    if isinstance(value, tuple) and value and not isinstance(value, PackedSequence):
        value = value[0]
    if isinstance(value, PackedSequence):
        value = value.data
    return value if isinstance(value, Tensor) else None


def watch_sites(sites: Mapping[str, DropoutSite], observe: Observer) -> list[Removable]:
    """Hand every drop at one of ``sites`` during the next forwards to ``observe``.

    Dropout modules are watched with forward hooks (when the module runs in training
    mode); dropout a module's code does through a function call with a
    :class:`~lightning_dropout.sites.FunctionalProbe`. Remove the returned handles after.
    """
    handles: list[Removable] = []
    for site in sites.values():
        if site.is_module:
            handles.extend(_module_hooks(site, observe))
    probe = FunctionalProbe(sites, observe)
    probe.open()
    handles.append(probe)
    return handles


def _module_hooks(site: DropoutSite, observe: Observer) -> list[Removable]:
    pending: list[Callable[[Tensor], None] | None] = []  # a stack: a module may run nested

    def before(module: nn.Module, args: Any) -> None:
        x = first_tensor(args)
        if x is not None and module.training:
            with torch.no_grad():
                pending.append(observe(site, x))

    def after(module: nn.Module, args: Any, output: Any) -> None:
        if not pending:
            return
        finish, out = pending.pop(), first_tensor(output)
        if finish is not None and out is not None:
            with torch.no_grad():
                finish(out)

    return [site.module.register_forward_pre_hook(before), site.module.register_forward_hook(after)]


def resolve_modules(model: nn.Module, patterns: list[str], argument: str = "modules") -> dict[str, nn.Module]:
    """The modules whose qualified names match one of ``patterns`` (``fnmatch`` globs on
    the whole name, so ``"head.1"`` is that module and ``"blocks.*.mlp"`` every block's).

    Raises:
        ValueError: a pattern matches no module (the message lists the modules there are).
    """
    modules = {name: module for name, module in model.named_modules() if name}
    unknown = [p for p in patterns if not any(fnmatchcase(name, p) for name in modules)]
    if unknown:
        known = ", ".join(repr(name) for name in modules) or "(none)"
        raise ValueError(f"{argument}= names unknown modules {unknown}; the model's modules are: {known}")
    return {name: m for name, m in modules.items() if any(fnmatchcase(name, p) for p in patterns)}


class StepMonitor(DropoutCallback):
    """Measures every ``every_n_steps`` optimizer steps: hooks live from the measured
    batch's start to its end and are removed after it (and after fit, whatever happens).

    Subclasses choose what they watch in ``_select`` (called in ``setup``; an empty
    choice makes the monitor idle), attach their hooks in ``_attach`` and log in ``_report``.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self._forget_run()

    def _forget_run(self) -> None:
        super()._forget_run()
        self._interval = 1
        self._active = False
        self._last_step = -1
        self._measuring = False
        self._handles: list[Removable] = []
        self.watched: Mapping[str, object] = {}

    @property
    def _name(self) -> str:
        return type(self).__name__

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Trainer sets log_every_n_steps at run time (0 with barebones=True: never measure).
        self._interval = self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))
        self._last_step = -1
        self.watched = self._select(pl_module)
        self._active = (
            bool(self.watched) and self._interval > 0 and _dashboard.check_loggers(trainer, self._name)
        )
        if not self.watched:
            if find_sites(pl_module):
                warn_once(trainer, f"no-layers-{self._name}", self._nothing_message())
            else:  # one warning for all the monitors
                warn_once(
                    trainer, "no-dropout", "The model has no dropout sites; the dropout monitors do nothing."
                )
        if self._active:
            _dashboard.register_charts(trainer, *self._charts())

    def _select(self, pl_module: pl.LightningModule) -> Mapping[str, object]:
        raise NotImplementedError

    def _nothing_message(self) -> str:
        return f"{self._name}: none of the model's dropout sites can be monitored."

    def _charts(self) -> tuple[str, _dashboard.Charts]:
        raise NotImplementedError

    def _attach(self) -> list[Removable]:
        raise NotImplementedError

    def _report(self, trainer: pl.Trainer, step: int) -> None:
        raise NotImplementedError

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report_sites(trainer, pl_module)
        if self._active:
            _dashboard.write_layout(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.check_modes(trainer, pl_module, batch_idx)
        step = trainer.global_step
        # Under gradient accumulation several batches share a step: measure the first.
        if not self._active or step % self._interval or step == self._last_step:
            return
        self._last_step = step
        self._measuring = True
        self._handles.extend(self._attach())

    @override
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
        """Sizes of the metrics created so far, by name; monitors sizing metrics lazily
        (from the first activations they see) override this and ``_create_metric``."""
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

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
