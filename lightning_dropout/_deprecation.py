"""Renamed arguments and names: the old spelling keeps working and says so once.

Every rename of a public name goes through here, so each old name warns the same way: one
``DeprecationWarning`` per old name and process, pointing at the caller's line, naming
the new spelling. The names still accepted, and where they went:

====================================================  ==============================================
old                                                   new
====================================================  ==============================================
``DropoutMixin.dropout_layers(pattern=)``             ``DropoutMixin.dropout_layers(sites=)``
``DropoutMixin.set_dropout_p(pattern=)``              ``DropoutMixin.set_dropout_p(sites=)``
``ChannelDropMonitor(layers=)``                       ``ChannelDropMonitor(sites=)``
``CoActivationMonitor(layers=)``                      ``CoActivationMonitor(modules=)``
``DropoutScheduler(targets=)``                        ``DropoutScheduler(extra_modules=)``
``lightning_dropout.RankStreams``                     ``lightning_dropout.random_streams.RankStreams``
``lightning_dropout.metrics.co_activation``           ``lightning_dropout.metrics.coactivation``
====================================================  ==============================================
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

T = TypeVar("T")

# Old names already warned about in this process: a deprecation is said once, not at
# every call of a method that runs every step.
_said: set[str] = set()


def _warn_once(old: str, new: str) -> None:
    if old in _said:
        return
    _said.add(old)
    # Four frames up: here, the helper below, the function that received the old name,
    # and the caller's line that used it.
    warnings.warn(f"{old} is deprecated; use {new} instead.", DeprecationWarning, stacklevel=4)


def renamed_argument(owner: str, old: str, new: str, old_value: Any, new_value: T) -> T:
    """The value of argument ``new`` of ``owner``, which callers may still pass as ``old``.

    None means "not given" for both spellings. The old name warns once per process.

    Args:
        owner: the function or class, as callers write it (``"DropoutMixin.set_dropout_p"``).
        old: the argument's old name.
        new: the argument's name now.
        old_value: what the caller passed as ``old`` (None when not given).
        new_value: what the caller passed as ``new`` (None when not given).

    Raises:
        TypeError: both spellings were given.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     value = renamed_argument("Monitor", "layers_example", "sites", ["head"], None)
        >>> value, str(caught[0].message)
        (['head'], 'Monitor(layers_example=) is deprecated; use Monitor(sites=) instead.')
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{owner} got both {new}= and its deprecated name {old}=; pass only {new}=")
    _warn_once(f"{owner}({old}=)", f"{owner}({new}=)")
    return old_value


def moved_name(module: str, name: str, moved: dict[str, tuple[str, Any]]) -> Any:
    """For a module's ``__getattr__``: an old name ``moved`` maps to (its new spelling, value).

    The old name warns once per process.

    Raises:
        AttributeError: ``name`` is not one of the moved names (the usual error).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     moved_name("pkg", "old_example", {"old_example": ("pkg.sub.new", 3)})
        3
    """
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, value = moved[name]
    _warn_once(f"{module}.{name}", new)
    return value
