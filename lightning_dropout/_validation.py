"""Argument checks shared by every layer, schedule and callback.

Errors name the argument and the value received, so a bad YAML config or a typo in a
call reads as what it is.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_real(name: str, value: Any, expected: str = "a real number") -> float:
    """Return ``value`` as a float if it is a real number, else raise naming ``name``.

    ``numbers.Real`` admits numpy scalars; bools are refused, since ``True`` for a rate or
    a length is a mistake in a config, not a value.

    Args:
        name: the argument's name, used in the error message.
        value: the value received.
        expected: what the argument must be, for the message (``"a float in [0, 1]"``).

    Raises:
        TypeError: ``value`` is not a real number.

    Example:
        >>> check_real("gamma", 2)
        2.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return float(value)


def check_probability(name: str, value: Any, *, allow_one: bool = True) -> float:
    """Return ``value`` as a float probability, or raise naming ``name``.

    Args:
        name: the argument's name, used in the error message.
        value: the value received.
        allow_one: whether 1.0 is allowed (layers accept it, schedules do not).

    Raises:
        TypeError: ``value`` is not a real number (bools are refused too).
        ValueError: ``value`` is NaN or outside [0, 1] (or [0, 1) without ``allow_one``).

    Example:
        >>> check_probability("p", 0.25)
        0.25
    """
    # A tensor p is refused because it would move the mask draw onto the tensor's device
    # and make every comparison a sync.
    p = check_real(name, value, "a float in [0, 1]")
    upper = "1]" if allow_one else "1)"
    if math.isnan(p) or p < 0.0 or p > 1.0 or (not allow_one and p == 1.0):
        raise ValueError(f"{name} must be in [0, {upper}, got {value!r}")
    return p


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise naming ``name``.

    Raises:
        TypeError: ``value`` is not a real number (bools are refused too).
        ValueError: ``value`` is not finite or not > 0.

    Example:
        >>> check_positive("temperature", 0.1)
        0.1
    """
    number = check_real(name, value, "a float > 0")
    if not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return number


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (>= ``minimum`` if given), else raise.

    Integer numpy scalars are accepted; bools and floats are refused, since ``True`` or
    ``3.0`` for a count or a seed is a mistake in a config, not a value.

    Args:
        name: the argument's name, used in the error message.
        value: the value received.
        minimum: the smallest value allowed, or None for any integer.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` < ``minimum``.

    Example:
        >>> check_int("step", 3, minimum=0)
        3
    """
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{bound}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise naming ``name``.

    Raises:
        TypeError: ``value`` is not an int (bools are refused).
        ValueError: ``value`` < 1.

    Example:
        >>> check_positive_int("n_samples", 4)
        4
    """
    return check_int(name, value, minimum=1)


def check_seed(name: str, value: Any) -> int | None:
    """Return ``value`` if it is None or an int (a seed), else raise naming ``name``.

    Raises:
        TypeError: ``value`` is neither None nor an int.

    Example:
        >>> check_seed("seed", None) is None, check_seed("seed", 7)
        (True, 7)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming ``name``.

    Raises:
        ValueError: ``value`` is not one of ``choices``.

    Example:
        >>> check_choice("interval", "step", ("step", "epoch"))
        'step'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise a TypeError naming ``name``.

    Raises:
        TypeError: ``value`` is not a bool (1 and "yes" are refused too).

    Example:
        >>> check_bool("inplace", False)
        False
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value
