"""The run's dropout sites, said once: an inventory table when training starts (like
Lightning's model summary) and a warning naming the sites that cannot drop because their
module is in eval mode (a submodule left in eval by user code trains with no dropout)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info

from lightning_dropout.callbacks._run import first_time, warn_sites_in_eval
from lightning_dropout.sites import DropoutSite, find_sites


def report_sites(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Once per run: print the site table (when the trainer prints its model summary) and
    warn about sites stuck in eval mode."""
    if not first_time(trainer, "site-report"):
        return
    sites = find_sites(pl_module)
    if sites and any(isinstance(callback, ModelSummary) for callback in _callbacks(trainer)):
        rank_zero_info(site_table(sites, controls(trainer, sites)))
    warn_sites_in_eval(trainer, sites)


def controls(trainer: pl.Trainer, sites: Mapping[str, DropoutSite]) -> dict[str, str]:
    """Who sets each site's rate: what the callbacks say through ``site_controls()`` (the
    scheduler: its group), "fixed" for rates written in code, else nothing."""
    said: dict[str, str] = {}
    for callback in _callbacks(trainer):
        site_controls = getattr(callback, "site_controls", None)
        if callable(site_controls):
            said.update(site_controls())
    for name, site in sites.items():
        if not site.settable:
            said[name] = "fixed (written in code)"
        elif site.learned:
            said[name] = "learned"
    return said


def _callbacks(trainer: pl.Trainer) -> list[pl.Callback]:
    # Set by Lightning's callback connector; not declared on the class for type checkers.
    return list(getattr(trainer, "callbacks", []))


def site_table(sites: Mapping[str, DropoutSite], control: Mapping[str, str]) -> str:
    """A text table of ``sites``: name, kind, p and who controls it.

    Example:
        >>> from lightning_dropout.sites import find_sites
        >>> sites = find_sites(torch.nn.Sequential(torch.nn.Dropout(0.25)))
        >>> print(site_table(sites, {"0": "schedule 'all'"}))
        Dropout sites
          | Name | Kind    | p    | Control
        ------------------------------------------
        0 | 0    | dropout | 0.25 | schedule 'all'
    """
    rows = [
        (str(i), name, site.kind, "?" if site.p is None else f"{site.p:.4g}", control.get(name, "-"))
        for i, (name, site) in enumerate(sites.items())
    ]
    header = ("", "Name", "Kind", "p", "Control")
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

    lines = [line(header), "-" * (sum(widths) + 3 * (len(widths) - 1)), *map(line, rows)]
    return "\n".join(["Dropout sites", *lines])
