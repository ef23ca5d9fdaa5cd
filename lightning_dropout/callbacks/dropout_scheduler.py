"""Schedule dropout probabilities over training, per group of dropout sites, and survive a resume.

Before every training batch :class:`DropoutScheduler` sets the drop probability of the
sites it drives to ``schedule(index)``, where ``index`` is ``trainer.global_step``
(``interval="step"``) or ``trainer.current_epoch`` (``interval="epoch"``). The value is a
pure function of the index, which every rank holds identically, so all DDP ranks agree
without communicating, and a run resumed from any checkpoint (even mid-epoch) replays the
uninterrupted run's trajectory. Nothing is changed outside training batches: validation,
test and predict keep whatever p training left (the last scheduled value).

Which sites: every dropout site of the model (see :mod:`lightning_dropout.sites`):
dropout modules (this package's, torch's, timm's DropPath / DropBlock2d / PatchDropout,
torchvision's StochasticDepth), attention dropout, rates a forward reads
(``attention_dropout``, ``drop_rate``), ``nn.LSTM(dropout=)``. Sites whose rate is written
in the code cannot be set; they are named in a warning.

Drop-path depth profiles: timm and torchvision build drop-path rates that grow with depth
(0.014 ... 0.1). A group's drop-path sites keep that profile: the largest built rate
follows the schedule and the others keep their proportion to it (``depth_profile=False``
sets them all to the schedule's value).

torch.compile: this package's activation-dropout layers hold p in a float tensor buffer
as well as in the Python float ``layer.p``; compiled graphs read the tensor, so a p that
changes every step is a graph input rather than a guarded constant and causes no
recompilation. torch's own dropout layers (and every float rate attribute) take p as a
Python float, which torch.compile specialises on: each new value recompiles until the
recompile limit (8), after which the module runs uncompiled. Use this package's layers in
compiled models whose p is scheduled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_dropout._deprecation import renamed_argument
from lightning_dropout._validation import check_bool, check_choice, check_probability
from lightning_dropout.callbacks._run import DropoutCallback
from lightning_dropout.callbacks._site_report import report_sites
from lightning_dropout.schedules import Schedule
from lightning_dropout.selection import assign, matches_name
from lightning_dropout.sites import DropoutSite, find_sites
from lightning_dropout.sites.discovery import GENERIC_RATE_ATTRIBUTES

INTERVALS = ("step", "epoch")
SINGLE_GROUP = "all"

Target = str | type[nn.Module]


class DropoutScheduler(DropoutCallback):
    """Set dropout probabilities from schedules before every training batch, and log them.

    ``schedule`` is one :class:`~lightning_dropout.schedules.Schedule` for every dropout
    site (the group is then called ``"all"``), or a mapping ``{pattern: schedule}`` of site
    groups. A pattern is a glob on qualified site names (``"encoder"``,
    ``"*attention*"``, ``"blocks.*.drop_path"``); a pattern naming a module takes in every
    site below it. A site matched by several patterns belongs to the most specific one
    (see :mod:`lightning_dropout.selection`), so ``{"*attention*": ..., "*": ...}`` gives
    attention its own schedule and everything else the catch-all. Sites no pattern
    matches keep their rate.

    Lengths given as fractions (``Linear(0.0, 0.3, steps=0.5)``) are resolved against
    ``trainer.estimated_stepping_batches`` (``interval="step"``) or ``trainer.max_epochs``
    (``interval="epoch"``) when fit starts; the resolved length is saved in the checkpoint,
    so a resumed run keeps the schedule it started with.

    Logs ``dropout/<group>/p`` to every logger in ``trainer.loggers`` whenever the trainer
    logs (``log_every_n_steps``), at the same step as the training metrics.

    A Trainer may hold several schedulers (say one on steps for the attention, one on
    epochs for the rest) as long as no site belongs to two of them; each keeps its own
    checkpoint state, found again on resume by its groups and interval. Resuming from a
    checkpoint written by a scheduler of other groups or another interval is an error
    naming both, unless ``restart=True`` says to start this scheduler anew.

    Args:
        schedule: a schedule, or a non-empty mapping from site patterns to schedules.
        extra_modules: modules to drive as sites although the discovery rules do not find
            them (they add to the sites found, and do not narrow them): a string is a glob
            on module names or the name of a module class (or a base class), a type
            matches its instances; a list adds what any entry matches. A module named here
            is driven through its rate attribute (``p``, ``drop_prob``, ``prob`` or
            ``drop_rate``) and joins the group its name falls in.
        interval: ``"step"`` (index = ``trainer.global_step``) or ``"epoch"`` (index =
            ``trainer.current_epoch``).
        depth_profile: keep the built proportions between a group's drop-path sites
            (True), or set them all to the schedule's value (False).
        restart: on resume, take nothing from the checkpoint's scheduler state: fractional
            lengths resolve against the resumed run and drop-path profiles are read from
            the model as loaded. The index stays ``trainer.global_step`` (or
            ``current_epoch``). Needed to resume with other groups or another interval.
        targets: the deprecated name of ``extra_modules``.

    Raises:
        TypeError: ``schedule`` is not a Schedule or a mapping of str to Schedule, or
            ``extra_modules`` holds something other than strings and module types, or both
            ``extra_modules`` and ``targets`` are given.
        ValueError: an empty ``schedule`` mapping or pattern, empty ``extra_modules``, or an
            unknown ``interval``. At fit start: a model without dropout sites, a group or
            ``extra_modules`` entry matching nothing, two equally specific patterns for one site,
            a group taking in a site whose p is learned (ConcreteDropout), fractional lengths
            in a run of unknown length, or a site that another ``DropoutScheduler`` of the
            same Trainer schedules too. On resume: the checkpoint holds the state of a
            scheduler with other groups or interval that no scheduler of the Trainer takes
            (pass ``restart=True`` to start anew).

    Example:
        >>> from lightning_dropout.schedules import Constant, Linear
        >>> DropoutScheduler({"encoder": Linear(0.0, 0.3, steps=0.5), "head": Constant(0.1)})
        DropoutScheduler({'encoder': Linear(start=0.0, end=0.3, steps=0.5), 'head': Constant(p=0.1)})
    """

    def __init__(
        self,
        schedule: Schedule | dict[str, Schedule],
        extra_modules: Target | list[Target] | None = None,
        interval: str = "step",
        depth_profile: bool = True,
        restart: bool = False,
        *,
        targets: Target | list[Target] | None = None,
    ) -> None:
        self.schedules = check_schedules(schedule)
        extra_modules = renamed_argument(
            "DropoutScheduler", "targets", "extra_modules", targets, extra_modules
        )
        self.extra_modules = check_extra_modules(extra_modules)
        self.interval = check_choice("interval", interval, INTERVALS)
        self.depth_profile = check_bool("depth_profile", depth_profile)
        self.restart = check_bool("restart", restart)
        self._single = isinstance(schedule, Schedule)
        self._total: int | None = None
        self._restored: dict[str, Any] | None = None
        # Site name -> its share of the group's p (drop-path depth profiles), kept across
        # fits and checkpoints: once scheduled, the model no longer shows the built rates.
        self._shares: dict[str, float] = {}
        self._forget_run()

    def _forget_run(self) -> None:
        super()._forget_run()
        self._groups: dict[str, list[DropoutSite]] = {}
        self._resolved: dict[str, Schedule] = {}
        self._plan: list[tuple[str, Any, str, float]] = []  # (group, holder, attribute, share)

    def __repr__(self) -> str:
        schedule = self.schedules[SINGLE_GROUP] if self._single else self.schedules
        extra = "" if self.extra_modules is None else f", extra_modules={self.extra_modules!r}"
        interval = "" if self.interval == "step" else f", interval={self.interval!r}"
        profile = "" if self.depth_profile else ", depth_profile=False"
        restart = ", restart=True" if self.restart else ""
        return f"{type(self).__name__}({schedule!r}{extra}{interval}{profile}{restart})"

    @property
    @override
    def state_key(self) -> str:
        # Several schedulers may share a Trainer (one per group of sites, one on steps and
        # one on epochs): each keeps its own state, keyed by what it drives. The values of
        # the schedules are left out so a resume with changed schedules finds its state.
        return self._generate_state_key(groups=list(self.schedules), interval=self.interval)

    @property
    def groups(self) -> dict[str, list[DropoutSite]]:
        """The sites each group drives during fit, by group name (empty outside fit)."""
        return self._groups

    def find_groups(self, module: nn.Module) -> dict[str, list[DropoutSite]]:
        """The settable sites of ``module`` each group drives, by group name.

        Raises:
            ValueError: no dropout site, ``extra_modules`` or a group matching nothing, two
                equally specific patterns for one site, or a site whose p is learned.

        Example:
            >>> from lightning_dropout.schedules import Constant
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
            >>> DropoutScheduler(Constant(0.1)).find_groups(net)
            {'all': [DropoutSite('1', kind='dropout', p=0.5)]}
        """
        found = find_sites(module, include=self._is_extra if self.extra_modules else None)
        if not found:
            raise ValueError(f"DropoutScheduler found no dropout site in {type(module).__name__}")
        for target in self.extra_modules or ():
            if not any(
                site.is_module and matches_target(name, site.module, target) for name, site in found.items()
            ):
                raise ValueError(
                    f"extra_modules entry {target!r} matches no module with a drop rate "
                    f"({', '.join(GENERIC_RATE_ATTRIBUTES)}) in {type(module).__name__}"
                )
        assigned = {SINGLE_GROUP: list(found)} if self._single else assign(found, list(self.schedules))
        learned = sorted(n for names in assigned.values() for n in names if found[n].learned)
        if learned:
            raise ValueError(
                f"DropoutScheduler cannot schedule a learned p (ConcreteDropout): {learned}; give "
                "schedules for patterns that leave these sites out"
            )
        fixed = sorted(name for names in assigned.values() for name in names if not found[name].settable)
        if fixed:
            rank_zero_warn(
                f"DropoutScheduler cannot set these dropout sites (their rate is written in code): {fixed}"
            )
        return {group: [found[n] for n in names if found[n].settable] for group, names in assigned.items()}

    def site_controls(self) -> dict[str, str]:
        """What this scheduler sets, for the site table: site name -> ``"schedule '<group>'"``."""
        return {site.name: f"schedule {group!r}" for group, sites in self._groups.items() for site in sites}

    def _is_extra(self, name: str, module: nn.Module) -> bool:
        return any(matches_target(name, module, target) for target in self.extra_modules or ())

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here rather than in setup: layers built in configure_model exist only from now on.
        self._groups = self.find_groups(pl_module)
        self._shares = {**depth_shares(self._groups), **self._shares} if self.depth_profile else {}
        self._plan = [
            (group, site.holder, str(site.attribute), self._shares.get(site.name, 1.0))
            for group, sites in self._groups.items()
            for site in sites
        ]
        if any(s.is_fractional() for s in self.schedules.values()) and self._total is None:
            self._total = self._run_length(trainer)
        current = {"interval": self.interval, "schedules": self._schedule_reprs()}
        if self._restored is not None and self._restored != current:
            rank_zero_warn(
                f"DropoutScheduler resumed with {current} but the checkpoint was written with "
                f"{self._restored}; the new configuration applies from here."
            )
        total = self._total
        self._resolved = {
            group: s.resolve(total) if total is not None and s.is_fractional() else s
            for group, s in self.schedules.items()
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every scheduler's on_fit_start: each knows its sites now.
        mine = self.site_controls()
        for other in getattr(trainer, "callbacks", []):
            if isinstance(other, DropoutScheduler) and other is not self:
                shared = sorted(set(mine) & set(other.site_controls()))
                if shared:
                    raise ValueError(
                        f"{self!r} and {other!r} both schedule the dropout sites {shared}; "
                        "give each site to one scheduler"
                    )
        report_sites(trainer, pl_module)

    def _run_length(self, trainer: pl.Trainer) -> int | None:
        """The run's length in intervals; None for a run that trains on no batch (nothing
        to schedule: ``max_steps=0``, ``max_epochs=0``, ``limit_train_batches=0``).

        Raises:
            ValueError: the length is unknown (the message names what to set).
        """
        if 0 in (trainer.max_steps, trainer.max_epochs, trainer.limit_train_batches):
            return None
        unknown = "schedule lengths are fractions of the run, but the run's length in {} is unknown: {}"
        if self.interval == "epoch":
            if trainer.max_epochs is not None and trainer.max_epochs > 0:
                return trainer.max_epochs
            raise ValueError(
                unknown.format(
                    "epochs",
                    f"the Trainer has max_epochs={trainer.max_epochs} (max_steps counts steps, not "
                    "epochs); set max_epochs, or give lengths as ints",
                )
            )
        total = trainer.estimated_stepping_batches
        if total == 0:
            return None  # an empty train dataloader
        if 1 <= total < float("inf"):
            return int(total)
        if trainer.max_epochs == -1:
            reason = "the Trainer has max_steps=-1 and max_epochs=-1; set max_steps or max_epochs"
        else:
            reason = "the train dataloader has no length; set max_steps"
        raise ValueError(unknown.format("steps", f"{reason}, or give lengths as ints"))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.check_modes(trainer, pl_module, batch_idx)
        index = trainer.global_step if self.interval == "step" else trainer.current_epoch
        rates = self.rates(index)
        # The per-step hot path: rates() validated each p and shares lie in [0, 1], so the
        # targets are valid probabilities and are written without DropoutSite.set_p's checks.
        for group, holder, attribute, share in self._plan:
            target = rates[group] * share
            if getattr(holder, attribute) != target:
                setattr(holder, attribute, target)
        # Through the module's public logging, on the steps the trainer writes logs (its
        # log_every_n_steps rule, read before the step runs): logging costs a few hundred
        # microseconds, too much for every step.
        every = int(getattr(trainer, "log_every_n_steps", 50))  # set by the Trainer at run time
        if trainer.loggers and every and (trainer.global_step + 1) % every == 0:
            # float64 tensors: Lightning would store a float as float32 (0.15 -> 0.150000006)
            metrics = {f"dropout/{g}/p": torch.tensor(p, dtype=torch.float64) for g, p in rates.items()}
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def rates(self, index: int) -> dict[str, float]:
        """The p of every group at ``index`` (a global step or an epoch), by group name.

        Raises:
            ValueError: a schedule returned a value outside [0, 1).

        Example:
            >>> from lightning_dropout.schedules import Linear
            >>> DropoutScheduler({"encoder": Linear(0.0, 0.2, steps=10)}).rates(5)
            {'encoder': 0.1}
        """
        schedules = self._resolved or self.schedules
        return {
            group: check_probability(f"schedule[{group!r}]({index})", s(index), allow_one=False)
            for group, s in schedules.items()
        }

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._groups, self._resolved, self._plan = {}, {}, []
            self._total = self._restored = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "total": self._total,
            "schedules": self._schedule_reprs(),
            "shares": dict(self._shares),
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved: dict[str, Any] = checkpoint.get("callbacks") or {}
        if self.restart or self.state_key in saved:
            return
        taken = {c.state_key for c in getattr(trainer, "callbacks", []) if isinstance(c, DropoutScheduler)}
        prefix = f"{type(self).__qualname__}{{"
        orphans = [state for key, state in saved.items() if key.startswith(prefix) and key not in taken]
        if orphans:
            written = "; ".join(_describe(state) for state in orphans)
            raise ValueError(
                f"{self!r} resumes from a checkpoint written by a DropoutScheduler of other groups or "
                f"interval ({written}); this one has groups {list(self.schedules)} (interval "
                f"{self.interval!r}). Give the checkpoint's groups and interval to continue its "
                "schedule, or pass restart=True to start this scheduler anew (its run length and "
                "drop-path profile then come from the resumed run)."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.restart:
            return
        self._total = state_dict.get("total")
        self._shares = dict(state_dict.get("shares", {}))
        self._restored = {"interval": state_dict.get("interval"), "schedules": state_dict.get("schedules")}

    def _schedule_reprs(self) -> dict[str, str]:
        return {group: repr(s) for group, s in self.schedules.items()}


def _describe(state: Mapping[str, Any]) -> str:
    """A saved scheduler state's groups and interval, for messages."""
    return f"groups {list(state.get('schedules') or {})}, interval {state.get('interval')!r}"


def depth_shares(groups: dict[str, list[DropoutSite]]) -> dict[str, float]:
    """Each drop-path site's rate over the largest drop-path rate of its group.

    Example:
        >>> holders = [torch.nn.Module() for _ in range(3)]
        >>> for holder, p in zip(holders, (0.05, 0.1, 0.2)):
        ...     holder.drop_prob = p
        >>> sites = [DropoutSite(f"b{i}", "drop_path", h, (h,), h, "drop_prob")
        ...          for i, h in enumerate(holders)]
        >>> depth_shares({"all": sites})
        {'b0': 0.25, 'b1': 0.5, 'b2': 1.0}
    """
    shares: dict[str, float] = {}
    for sites in groups.values():
        paths = [site for site in sites if site.kind == "drop_path"]
        top = max((site.p or 0.0 for site in paths), default=0.0)
        if top > 0.0:
            shares.update({site.name: (site.p or 0.0) / top for site in paths})
    return shares


def matches_target(name: str, module: nn.Module, target: Target) -> bool:
    """Whether ``module`` called ``name`` is selected by ``target`` (a glob, class name or type).

    Example:
        >>> drop = torch.nn.Dropout()
        >>> matches_target("head.drop", drop, "Dropout"), matches_target("x", drop, "h*")
        (True, False)
    """
    if isinstance(target, type):
        return isinstance(module, target)
    return matches_name(name, target) or any(target == cls.__name__ for cls in type(module).__mro__)


def check_schedules(schedule: Any) -> dict[str, Schedule]:
    """``schedule`` as a mapping from group name to schedule, validated.

    Raises:
        TypeError: not a Schedule or a mapping from strings to Schedules.
        ValueError: an empty mapping or an empty pattern.

    Example:
        >>> from lightning_dropout.schedules import Constant
        >>> check_schedules(Constant(0.1))
        {'all': Constant(p=0.1)}
    """
    if isinstance(schedule, Schedule):
        return {SINGLE_GROUP: schedule}
    if not isinstance(schedule, Mapping):
        raise TypeError(
            f"schedule must be a Schedule or a mapping {{pattern: Schedule}}, got {type(schedule).__name__} "
            f"{schedule!r}"
        )
    if not schedule:
        raise ValueError("schedule must map at least one site pattern to a Schedule, got an empty mapping")
    for pattern, value in schedule.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"schedule patterns must be non-empty strings, got {pattern!r}")
        if not isinstance(value, Schedule):
            raise TypeError(f"schedule[{pattern!r}] must be a Schedule, got {type(value).__name__} {value!r}")
    return dict(schedule)


def check_extra_modules(extra_modules: Any) -> list[Target] | None:
    """``extra_modules`` as a list of globs / class names / module types, or None.

    Raises:
        TypeError: an entry that is neither a string nor an nn.Module subclass.
        ValueError: an empty list or an empty string.

    Example:
        >>> check_extra_modules("encoder.*"), check_extra_modules([torch.nn.Dropout])
        (['encoder.*'], [<class 'torch.nn.modules.dropout.Dropout'>])
    """
    if extra_modules is None:
        return None
    entries = [extra_modules] if isinstance(extra_modules, (str, type)) else extra_modules
    if not isinstance(entries, Sequence):
        raise TypeError(
            f"extra_modules must be a string, a module type or a list of them, got {extra_modules!r}"
        )
    if not entries:
        raise ValueError("extra_modules must name at least one module pattern or type, got an empty list")
    for entry in entries:
        if isinstance(entry, str):
            if not entry:
                raise ValueError("extra_modules must not hold an empty string")
        elif not (isinstance(entry, type) and issubclass(entry, nn.Module)):
            raise TypeError(
                "extra_modules entries must be strings or nn.Module subclasses, "
                f"got {type(entry).__name__} {entry!r}"
            )
    return list(entries)
