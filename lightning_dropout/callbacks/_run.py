"""What the package's callbacks of one run share, held by the callbacks themselves.

Several callbacks contribute to one TensorBoard layout (TensorBoard keeps one per writer)
and some messages are said once per run however many callbacks notice. That shared state
lives on the first of the package's callbacks in ``trainer.callbacks`` (every callback of
the package derives from :class:`DropoutCallback`), renewed for each new trainer, so no
module keeps state of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dropout.sites import DropoutSite, find_sites

# Multiline charts: title -> tag regexes (matched from the start of the tag).
Charts = dict[str, list[str]]


@dataclass
class RunState:
    """One run's shared state: the custom-scalars layout and what was said once."""

    categories: dict[str, Charts] = field(default_factory=dict)
    layout_written: bool = False
    said: set[str] = field(default_factory=set)


class DropoutCallback(pl.Callback):
    """Base of the package's callbacks (see the module doc)."""

    _run_state: tuple[weakref.ref[pl.Trainer], RunState] | None = None

    def check_modes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """On each epoch's first training batch, warn about dropout sites left in eval mode.

        User code may change modes between epochs, so this runs every epoch; the first of
        the run's callbacks to ask does the check, and the warning is said once per run.
        """
        if batch_idx == 0 and first_time(
            trainer, f"check-modes-{trainer.current_epoch}-{trainer.global_step}"
        ):
            warn_sites_in_eval(trainer, find_sites(pl_module))


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
