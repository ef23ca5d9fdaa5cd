"""The one selection language of the package: globs on qualified names.

A pattern is an ``fnmatch`` glob (case-sensitive) on a dotted qualified name such as
``"encoder.layer.0.attention.self.dropout"``. A pattern that matches a module also
matches everything below it, so ``"encoder"`` selects every site inside ``encoder``.
The scheduler, the mixin, Monte-Carlo inference and the monitors all select this way.

When several patterns match one name (groups of a scheduler), the most specific wins:
the one that matches the shortest-but-deepest module, i.e. whose shallowest matching
prefix of the name is deepest. A pattern matching the site itself beats one matching its
block, which beats one matching the encoder; ``"*"`` already matches the first part of any
name, so it is the catch-all that every other pattern overrides. At equal depth the
pattern with more literal (non-wildcard) characters wins; a remaining tie is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any


def match_depth(name: str, pattern: str) -> int | None:
    """How many dotted parts of ``name`` the shallowest prefix matching ``pattern`` has;
    None when no prefix matches.

    Example:
        >>> match_depth("encoder.layer.0.drop", "encoder"), match_depth("encoder.layer.0.drop", "*.0")
        (1, 3)
        >>> match_depth("decoder.drop", "enc*") is None
        True
    """
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        if fnmatchcase(".".join(parts[:depth]), pattern):
            return depth
    return None


def matches_name(name: str, pattern: str) -> bool:
    """Whether ``name`` matches glob ``pattern`` or lies below a module it matches.

    Example:
        >>> matches_name("encoder.block.0.drop", "encoder"), matches_name("decoder.drop", "enc*")
        (True, False)
    """
    return match_depth(name, pattern) is not None


def check_patterns(argument: str, patterns: Any) -> list[str] | None:
    """``patterns`` (None, one glob or a sequence of globs) as a list, validated.

    Raises:
        TypeError: not a string, a sequence of strings or None.
        ValueError: an empty pattern or an empty sequence.

    Example:
        >>> check_patterns("sites", "encoder"), check_patterns("sites", None)
        (['encoder'], None)
    """
    if patterns is None:
        return None
    entries = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(entries, Sequence) or not all(isinstance(p, str) for p in entries):
        raise TypeError(
            f"{argument} must be a glob string, a list of them or None, got {type(patterns).__name__} "
            f"{patterns!r}"
        )
    if not entries or not all(entries):
        raise ValueError(f"{argument} must hold non-empty glob strings, got {patterns!r}")
    return list(entries)


def select(names: Iterable[str], patterns: Sequence[str] | None, what: str = "dropout site") -> list[str]:
    """The names matched by any of ``patterns`` (all of them for None), in their order.

    Raises:
        ValueError: a pattern matches no name (the message lists the names there are).

    Example:
        >>> select(["enc.drop", "dec.drop", "head"], ["enc", "head"])
        ['enc.drop', 'head']
    """
    names = list(names)
    if patterns is None:
        return names
    for pattern in patterns:
        if not any(matches_name(name, pattern) for name in names):
            raise ValueError(f"pattern {pattern!r} matches no {what}; the {what}s are {names}")
    return [name for name in names if any(matches_name(name, pattern) for pattern in patterns)]


def specificity(name: str, pattern: str) -> tuple[int, int] | None:
    """How specifically ``pattern`` names ``name``: (match depth, literal characters);
    None when it does not match.

    Example:
        >>> specificity("enc.attn.drop", "*"), specificity("enc.attn.drop", "*attn*")
        ((1, 0), (2, 4))
    """
    depth = match_depth(name, pattern)
    if depth is None:
        return None
    return depth, sum(1 for c in pattern if c not in "*?[]")


def assign(names: Iterable[str], patterns: Sequence[str], what: str = "dropout site") -> dict[str, list[str]]:
    """Give each name to the most specific pattern that matches it (see the module doc).

    Names no pattern matches are left out; a pattern may end up with no name when more
    specific ones took all it matches.

    Raises:
        ValueError: a pattern matches no name at all, or two patterns are equally
            specific for one name.

    Example:
        >>> assign(["enc.attn.drop", "enc.mlp.drop", "head.drop"], ["*", "*attn*", "head"])
        {'*': ['enc.mlp.drop'], '*attn*': ['enc.attn.drop'], 'head': ['head.drop']}
    """
    names = select(names, patterns, what)
    groups: dict[str, list[str]] = {pattern: [] for pattern in patterns}
    for name in names:
        ranked = sorted(
            ((score, pattern) for pattern in patterns if (score := specificity(name, pattern)) is not None),
            reverse=True,
        )
        if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
            raise ValueError(
                f"patterns {ranked[0][1]!r} and {ranked[1][1]!r} are equally specific for {what} {name!r}; "
                "make one of them name a deeper module or add a pattern for it"
            )
        groups[ranked[0][1]].append(name)
    return groups


__all__ = ["assign", "check_patterns", "match_depth", "matches_name", "select", "specificity"]
