"""The one selection language of the package: globs on qualified names.

A pattern is an ``fnmatch`` glob (case-sensitive) on a dotted qualified name such as
``"encoder.layer.0.attention.self.dropout"``. A pattern that matches a module also
matches everything below it, so ``"encoder"`` selects every site inside ``encoder``.
"""

from __future__ import annotations

from fnmatch import fnmatchcase


def matches_name(name: str, pattern: str) -> bool:
    """Whether ``name`` matches glob ``pattern`` or lies below a module it matches.

    Example:
        >>> matches_name("encoder.block.0.drop", "encoder"), matches_name("decoder.drop", "enc*")
        (True, False)
    """
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


__all__ = ["matches_name"]
