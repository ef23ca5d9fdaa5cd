"""Dropout-probability schedules: small validated callables ``schedule(step) -> p``.

Every schedule maps a step index (an int >= 0: the global step, or the epoch) to a drop
probability in [0, 1). They are pure Python: no torch, no Lightning.

Lengths (``steps``, ``milestones``, ``until``, ``start``) are either an int >= 1, a number
of steps, or a float in (0, 1], a fraction of the whole run. A schedule with fractional
lengths must be resolved against the run's length before it is called:
``schedule.resolve(total)`` returns a copy with every fraction ``f`` replaced by
``max(1, round(f * total))``. :class:`~lightning_dropout.callbacks.DropoutScheduler` does
this with ``trainer.estimated_stepping_batches`` (or ``max_epochs`` per epoch).

Schedules from the literature:

- Curriculum dropout (Morerio et al., "Curriculum Dropout", ICCV 2017): the drop rate
  rises from 0 toward its final value, ``p(t) = p_final (1 - exp(-gamma t))``.
- Early and late dropout (Liu et al., "Dropout Reduces Underfitting", ICML 2023):
  dropout only during the first steps (against underfitting) or only after a point
  (against overfitting).

Pieces are chained with :class:`Chain`. Every constructor argument is a plain number, a
list or a schedule, so LightningCLI configures them with ``class_path`` / ``init_args``;
the ``repr`` reads back as the call that built it.

Example:
    >>> schedule = Linear(start=0.0, end=0.5, steps=100)
    >>> schedule(0), schedule(50), schedule(1000)
    (0.0, 0.25, 0.5)
    >>> Chain([Constant(0.0), Cosine(0.0, 0.3, 0.5)], milestones=[0.25]).resolve(100)
    Chain(schedules=[Constant(p=0.0), Cosine(start=0.0, end=0.3, steps=50)], milestones=[25])
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from lightning_dropout._validation import check_int, check_positive, check_probability, check_real

__all__ = [
    "Chain",
    "Constant",
    "Cosine",
    "Curriculum",
    "EarlyDropout",
    "Exponential",
    "LateDropout",
    "Linear",
    "Schedule",
    "Step",
]

Length = int | float


def check_length(name: str, value: Any) -> Length:
    """Return ``value`` if it is a number of steps (int >= 1) or a fraction in (0, 1].

    Raises:
        TypeError: ``value`` is not an int or a float (bools are refused).
        ValueError: an int below 1, or a float outside (0, 1].

    Example:
        >>> check_length("steps", 100), check_length("steps", 0.5)
        (100, 0.5)
    """
    expected = "an int >= 1 (steps) or a float in (0, 1] (a fraction of the run)"
    fraction = check_real(name, value, expected)
    if isinstance(value, numbers.Integral):
        if value < 1:
            raise ValueError(f"{name} must be {expected}, got {value!r}")
        return int(value)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return fraction


def check_increasing(name: str, lengths: list[Length]) -> None:
    """Raise naming ``name`` unless ``lengths`` of one kind (steps or fractions) strictly increase."""
    one_kind = all(isinstance(v, int) for v in lengths) or all(isinstance(v, float) for v in lengths)
    if one_kind and any(b <= a for a, b in itertools.pairwise(lengths)):
        raise ValueError(f"{name} must be strictly increasing, got {lengths!r}")


def resolve_length(value: Length, total: int) -> int:
    """A fraction of ``total`` steps as a step count (at least 1); ints are returned unchanged."""
    if isinstance(value, int):
        return value
    return max(1, round(value * total))


class Schedule(ABC):
    """Base of every schedule: a callable ``schedule(step) -> p`` with p in [0, 1).

    A custom schedule implements :meth:`value`. To get a readable ``repr``, equality and
    :meth:`resolve`, its constructor stores its validated arguments in ``self._args`` (in
    signature order) and ``_lengths`` names those that may be fractions of the run.
    """

    _lengths: tuple[str, ...] = ()
    _args: dict[str, Any]

    @abstractmethod
    def value(self, step: int) -> float:
        """The drop probability at ``step`` (already validated, lengths resolved)."""

    def __call__(self, step: int) -> float:
        """The drop probability at ``step``.

        Raises:
            TypeError: ``step`` is not an int.
            ValueError: ``step`` < 0.
            RuntimeError: the schedule has fractional lengths and was not resolved.
        """
        step = check_int("step", step, minimum=0)
        if self._needs_resolve:
            raise RuntimeError(
                f"{self!r} has lengths given as fractions of the run; call .resolve(total_steps) "
                "first (DropoutScheduler does this from the trainer)"
            )
        return self.value(step)

    @functools.cached_property
    def _needs_resolve(self) -> bool:
        # Schedules do not change after construction: checked once, not at every call.
        return self.is_fractional()

    def is_fractional(self) -> bool:
        """Whether some length is a fraction of the run (so :meth:`resolve` is needed)."""
        for name, arg in self._config().items():
            if name in self._lengths and any(isinstance(v, float) for v in _as_list(arg)):
                return True
            if any(isinstance(v, Schedule) and v.is_fractional() for v in _as_list(arg)):
                return True
        return False

    def resolve(self, total: int) -> Schedule:
        """A copy whose fractional lengths are step counts for a run of ``total`` steps.

        Raises:
            TypeError: ``total`` is not an int.
            ValueError: ``total`` < 1, or resolved milestones collide.

        Example:
            >>> Linear(0.5, 0.0, steps=0.1).resolve(1000)
            Linear(start=0.5, end=0.0, steps=100)
        """
        total = check_int("total", total, minimum=1)
        resolved: dict[str, Any] = {}
        for name, arg in self._config().items():
            if name in self._lengths:
                resolved[name] = (
                    [resolve_length(v, total) for v in arg]
                    if isinstance(arg, list)
                    else resolve_length(arg, total)
                )
            elif isinstance(arg, list) and any(isinstance(v, Schedule) for v in arg):
                resolved[name] = [v.resolve(total) for v in arg]
            else:
                resolved[name] = arg
        return type(self)(**resolved)

    def _config(self) -> dict[str, Any]:
        return self.__dict__.get("_args", {})

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={arg!r}" for name, arg in self._config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._config() == self._config()

    def __hash__(self) -> int:
        return hash(repr(self))


def _as_list(arg: Any) -> list[Any]:
    return arg if isinstance(arg, list) else [arg]


def _clamp(p: float, a: float, b: float) -> float:
    """``p`` clipped to the interval spanned by ``a`` and ``b`` (undoes rounding error)."""
    return min(max(p, min(a, b)), max(a, b))


class Constant(Schedule):
    """The same drop probability at every step.

    Args:
        p: drop probability in [0, 1).

    Raises:
        TypeError: ``p`` is not a number.
        ValueError: ``p`` is NaN or outside [0, 1).

    Example:
        >>> Constant(0.1)(500)
        0.1
    """

    def __init__(self, p: float) -> None:
        self._args = {"p": check_probability("p", p, allow_one=False)}

    def value(self, step: int) -> float:
        return float(self._args["p"])


class _Ramp(Schedule):
    """From ``start`` to ``end`` over ``steps`` steps along ``_shape``, then held at ``end``."""

    _lengths = ("steps",)

    def __init__(self, start: float, end: float, steps: int | float) -> None:
        self._args = {
            "start": check_probability("start", start, allow_one=False),
            "end": check_probability("end", end, allow_one=False),
            "steps": check_length("steps", steps),
        }

    @staticmethod
    def _shape(fraction: float) -> float:
        """The ramp's progress in [0, 1] at ``fraction`` of its length."""
        raise NotImplementedError

    def value(self, step: int) -> float:
        start, end, steps = self._args["start"], self._args["end"], self._args["steps"]
        if step >= steps:
            return float(end)
        return _clamp(start + (end - start) * self._shape(step / steps), start, end)


class Linear(_Ramp):
    """Linear ramp from ``start`` to ``end`` over ``steps`` steps, then held at ``end``.

    Args:
        start: p at step 0, in [0, 1).
        end: p from step ``steps`` on, in [0, 1).
        steps: ramp length: an int >= 1, or a float in (0, 1] (a fraction of the run).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``start`` or ``end`` outside [0, 1), or ``steps`` <= 0.

    Example:
        >>> Linear(0.0, 0.4, steps=4)(1), Linear(0.0, 0.4, steps=4)(9)
        (0.1, 0.4)
    """

    @staticmethod
    def _shape(fraction: float) -> float:
        return fraction


class Cosine(_Ramp):
    """Half-cosine from ``start`` to ``end`` over ``steps`` steps, then held at ``end``.

    ``p(t) = end + (start - end) (1 + cos(pi t / steps)) / 2``: flat at both ends.

    Args:
        start: p at step 0, in [0, 1).
        end: p from step ``steps`` on, in [0, 1).
        steps: an int >= 1, or a float in (0, 1] (a fraction of the run).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``start`` or ``end`` outside [0, 1), or ``steps`` <= 0.

    Example:
        >>> schedule = Cosine(0.5, 0.1, steps=10)
        >>> schedule(0), round(schedule(5), 6), schedule(10)
        (0.5, 0.3, 0.1)
    """

    @staticmethod
    def _shape(fraction: float) -> float:
        return (1.0 - math.cos(math.pi * fraction)) / 2.0


class Step(Schedule):
    """Piecewise constant: ``values[i]`` from ``milestones[i - 1]`` to ``milestones[i]``.

    Args:
        values: one more p than milestones, each in [0, 1).
        milestones: strictly increasing steps (ints >= 1) or fractions of the run.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a value outside [0, 1), a milestone <= 0, milestones not increasing,
            or ``len(values) != len(milestones) + 1``.

    Example:
        >>> schedule = Step(values=[0.0, 0.2, 0.1], milestones=[10, 20])
        >>> schedule(9), schedule(10), schedule(25)
        (0.0, 0.2, 0.1)
    """

    _lengths = ("milestones",)

    def __init__(self, values: list[float], milestones: list[int | float]) -> None:
        values_list = _check_list("values", values)
        milestone_list = _check_list("milestones", milestones)
        if len(values_list) != len(milestone_list) + 1:
            raise ValueError(
                f"values must hold one more entry than milestones, got {len(values_list)} values "
                f"and {len(milestone_list)} milestones"
            )
        checked = [check_length(f"milestones[{i}]", m) for i, m in enumerate(milestone_list)]
        check_increasing("milestones", checked)
        self._args = {
            "values": [
                check_probability(f"values[{i}]", v, allow_one=False) for i, v in enumerate(values_list)
            ],
            "milestones": checked,
        }

    def value(self, step: int) -> float:
        return float(self._args["values"][bisect.bisect_right(self._args["milestones"], step)])


class Exponential(Schedule):
    """Exponential approach from ``start`` to ``end``: ``end + (start - end) exp(-decay t)``.

    Args:
        start: p at step 0, in [0, 1).
        end: the limit as steps grow, in [0, 1).
        decay: the decay constant per step, > 0 (the gap halves every ``ln 2 / decay``
            steps). Not a drop probability: ``p`` is the only word for those.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``start`` or ``end`` outside [0, 1), or ``decay`` <= 0.

    Example:
        >>> schedule = Exponential(0.4, 0.0, decay=math.log(2) / 10)
        >>> schedule(0), round(schedule(10), 6)
        (0.4, 0.2)
    """

    def __init__(self, start: float, end: float, decay: float) -> None:
        self._args = {
            "start": check_probability("start", start, allow_one=False),
            "end": check_probability("end", end, allow_one=False),
            "decay": check_positive("decay", decay),
        }

    def value(self, step: int) -> float:
        start, end, decay = self._args["start"], self._args["end"], self._args["decay"]
        return _clamp(end + (start - end) * math.exp(-decay * step), start, end)


class Curriculum(Schedule):
    """Curriculum dropout (Morerio et al., ICCV 2017): ``p(t) = p_final (1 - exp(-gamma t))``.

    The network starts without dropout and the rate rises toward ``p_final`` as training
    goes on; the paper suggests ``gamma`` of about 10 / (total steps).

    Args:
        p_final: the limit of p, in [0, 1).
        gamma: the rise rate per step, > 0.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``p_final`` outside [0, 1), or ``gamma`` <= 0.

    Example:
        >>> schedule = Curriculum(p_final=0.5, gamma=0.01)
        >>> schedule(0), round(schedule(100), 4)
        (0.0, 0.3161)
    """

    def __init__(self, p_final: float, gamma: float) -> None:
        self._args = {
            "p_final": check_probability("p_final", p_final, allow_one=False),
            "gamma": check_positive("gamma", gamma),
        }

    def value(self, step: int) -> float:
        p_final, gamma = self._args["p_final"], self._args["gamma"]
        return _clamp(p_final * -math.expm1(-gamma * step), 0.0, p_final)


class EarlyDropout(Schedule):
    """Early dropout (Liu et al., ICML 2023): ``p`` before step ``until``, then 0.

    Args:
        p: drop probability of the early phase, in [0, 1).
        until: first step without dropout: an int >= 1 or a fraction of the run.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``p`` outside [0, 1), or ``until`` <= 0.

    Example:
        >>> EarlyDropout(0.1, until=50)(49), EarlyDropout(0.1, until=50)(50)
        (0.1, 0.0)
    """

    _lengths = ("until",)

    def __init__(self, p: float, until: int | float) -> None:
        self._args = {"p": check_probability("p", p, allow_one=False), "until": check_length("until", until)}

    def value(self, step: int) -> float:
        return float(self._args["p"]) if step < self._args["until"] else 0.0


class LateDropout(Schedule):
    """Late dropout (Liu et al., ICML 2023): 0 before step ``start``, then ``p``.

    Args:
        p: drop probability of the late phase, in [0, 1).
        start: first step with dropout: an int >= 1 or a fraction of the run.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``p`` outside [0, 1), or ``start`` <= 0.

    Example:
        >>> LateDropout(0.3, start=0.5).resolve(10)(5)
        0.3
    """

    _lengths = ("start",)

    def __init__(self, p: float, start: int | float) -> None:
        self._args = {"p": check_probability("p", p, allow_one=False), "start": check_length("start", start)}

    def value(self, step: int) -> float:
        return float(self._args["p"]) if step >= self._args["start"] else 0.0


class Chain(Schedule):
    """Schedules one after another: ``schedules[i]`` runs from ``milestones[i - 1]``.

    Each piece sees steps counted from its own start, so ``Chain([Constant(0.0),
    Linear(0.0, 0.3, 100)], milestones=[50])`` is 0 for 50 steps, then ramps for 100.

    Args:
        schedules: the pieces, one more than milestones.
        milestones: strictly increasing steps (ints >= 1) or fractions of the run at which
            the next piece takes over.

    Raises:
        TypeError: a piece that is not a :class:`Schedule`, or a wrongly typed milestone.
        ValueError: a milestone <= 0, milestones not increasing, or
            ``len(schedules) != len(milestones) + 1``.

    Example:
        >>> schedule = Chain([Constant(0.0), Linear(0.0, 0.3, 3)], milestones=[2])
        >>> [round(schedule(t), 2) for t in range(6)]
        [0.0, 0.0, 0.0, 0.1, 0.2, 0.3]
    """

    _lengths = ("milestones",)

    def __init__(self, schedules: list[Schedule], milestones: list[int | float]) -> None:
        pieces = _check_list("schedules", schedules)
        milestone_list = _check_list("milestones", milestones)
        for i, piece in enumerate(pieces):
            if not isinstance(piece, Schedule):
                raise TypeError(f"schedules[{i}] must be a Schedule, got {type(piece).__name__} {piece!r}")
        if len(pieces) != len(milestone_list) + 1:
            raise ValueError(
                f"schedules must hold one more entry than milestones, got {len(pieces)} schedules "
                f"and {len(milestone_list)} milestones"
            )
        checked = [check_length(f"milestones[{i}]", m) for i, m in enumerate(milestone_list)]
        check_increasing("milestones", checked)
        self._args = {"schedules": pieces, "milestones": checked}

    def value(self, step: int) -> float:
        milestones = self._args["milestones"]
        i = bisect.bisect_right(milestones, step)
        offset = milestones[i - 1] if i > 0 else 0
        return self._args["schedules"][i](step - offset)


def _check_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list, got {type(value).__name__} {value!r}")
    return list(value)
