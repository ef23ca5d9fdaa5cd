"""What the package's callbacks of one run share, held by the callbacks themselves.

Several callbacks contribute to one TensorBoard layout (TensorBoard keeps one per writer)
and some messages are said once per run however many callbacks notice. That shared state
lives on the first of the package's callbacks in ``trainer.callbacks`` (every callback of
the package derives from :class:`DropoutCallback`), renewed for each new trainer, so no
module keeps state of its own.

A copy of a callback (``copy.deepcopy``, ``pickle``, ``ddp_spawn`` sending the trainer to
its processes) is the callback as configured with its checkpoint state, at any point of
its life: what ties it to the run its original is in (this shared state and its trainer,
the model's modules and sites, hooks, metrics) is left out, and the copy rebuilds it in
the next trainer it joins, as a fresh callback does.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dropout.sites import DropoutSite, find_sites

# Multiline charts: title -> tag regexes (matched from the start of the tag).
Charts = dict[str, list[str]]
# Lightning sets these on every callback of a run: the LightningModule's bound methods.
_LIGHTNING_TIES = frozenset({"log", "log_dict"})


@dataclass
class RunState:
    """One run's shared state: the custom-scalars layout and what was said once."""

    categories: dict[str, Charts] = field(default_factory=dict)
    layout_written: bool = False
    said: set[str] = field(default_factory=set)


class DropoutCallback(pl.Callback):
    """Base of the package's callbacks (see the module doc).

    Subclasses set their per-run attributes in :meth:`_forget_run` (and call it from
    ``__init__``), so that copies leave them out.

    Example:
        >>> import copy, pickle
        >>> from lightning_dropout.callbacks import DropRateMonitor
        >>> copy.deepcopy(DropRateMonitor(every_n_steps=5)).every_n_steps
        5
        >>> pickle.loads(pickle.dumps(DropRateMonitor(sites="encoder"))).site_patterns
        ['encoder']
    """

    _run_state: tuple[weakref.ref[pl.Trainer], RunState] | None = None

    def _forget_run(self) -> None:
        """Set the attributes that tie the callback to one run to a fresh callback's values."""
        self._run_state = None

    def __getstate__(self) -> dict[str, Any]:
        ties = _run_attributes(type(self))
        return {name: value for name, value in self.__dict__.items() if name not in ties}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget_run()

    def check_modes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """On each epoch's first training batch, warn about dropout sites left in eval mode.

        User code may change modes between epochs, so this runs every epoch; the first of
        the run's callbacks to ask does the check, and the warning is said once per run.
        """
        if batch_idx == 0 and first_time(
            trainer, f"check-modes-{trainer.current_epoch}-{trainer.global_step}"
        ):
            warn_sites_in_eval(trainer, find_sites(pl_module))


def _run_attributes(cls: type[DropoutCallback]) -> frozenset[str]:
    """The names :meth:`DropoutCallback._forget_run` sets on an instance of ``cls``."""
    blank = cls.__new__(cls)
    blank._forget_run()
    return frozenset(vars(blank)) | _LIGHTNING_TIES


def run_state(trainer: pl.Trainer) -> RunState:
    """The shared state of the run ``trainer`` is doing.

    Example:
        >>> from lightning_dropout.callbacks import DropRateMonitor
        >>> trainer = pl.Trainer(callbacks=[DropRateMonitor()], logger=False)
        >>> run_state(trainer) is run_state(trainer)
        True
    """
    # Set by Lightning's callback connector; not declared on the class for type checkers.
    callbacks = getattr(trainer, "callbacks", [])
    holder = next((c for c in callbacks if isinstance(c, DropoutCallback)), None)
    if holder is None:
        return RunState()  # no package callback to share with
    if holder._run_state is None or holder._run_state[0]() is not trainer:
        holder._run_state = (weakref.ref(trainer), RunState())
    return holder._run_state[1]


def first_time(trainer: pl.Trainer, key: str) -> bool:
    """True the first time this run asks under ``key``: for what is said once per run."""
    state = run_state(trainer)
    if key in state.said:
        return False
    state.said.add(key)
    return True


def warn_once(trainer: pl.Trainer, key: str, message: str) -> None:
    """``rank_zero_warn`` ``message`` unless this run already warned under ``key``."""
    if first_time(trainer, key):
        rank_zero_warn(message)


def warn_sites_in_eval(trainer: pl.Trainer, sites: Mapping[str, DropoutSite]) -> None:
    """Warn once per run about sites with p > 0 whose gating module is in eval mode."""
    stuck = [name for name, site in sites.items() if (site.p or 0.0) > 0.0 and not site.training]
    if stuck:
        warn_once(
            trainer,
            "sites-in-eval",
            f"These dropout sites have p > 0 but a module that gates them is in eval mode, so they "
            f"do not drop in training: {stuck}. Lightning keeps the modes you set: call .train() "
            "on them if they should drop.",
        )
