"""Select a model's sites by pattern, set their rates, switch them on for Monte-Carlo."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import nn

from lightning_dropout._validation import check_probability
from lightning_dropout.selection import check_patterns, select
from lightning_dropout.sites.discovery import find_sites
from lightning_dropout.sites.site import DropoutSite

Patterns = str | Sequence[str] | None


def select_sites(
    model: nn.Module, sites: Patterns = None, found: Mapping[str, DropoutSite] | None = None
) -> dict[str, DropoutSite]:
    """The sites of ``model`` matching any of the globs ``sites`` (all for None).

    Args:
        model: the model.
        sites: one glob or a list of globs on qualified site names; a glob naming a
            module selects every site below it.
        found: the model's sites when already found (saves a search).

    Raises:
        TypeError: ``sites`` is not a string, a list of strings or None.
        ValueError: a pattern matches no site (the message lists the sites).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Sequential(torch.nn.Dropout()))
        >>> list(select_sites(net, "1"))
        ['1.0']
    """
    checked = check_patterns("sites", sites)
    found = find_sites(model) if found is None else found
    return {name: found[name] for name in select(found, checked)}


def dropout_layers(model: nn.Module, sites: Patterns = None) -> dict[str, nn.Module]:
    """The dropout modules of ``model`` (the sites that are modules), by qualified name.

    Dropout modules are this package's layers (DropConnect included), torch's
    (``_DropoutNd`` subclasses, AlphaDropout, FeatureAlphaDropout), timm's DropPath,
    DropBlock2d and PatchDropout, torchvision's StochasticDepth and registered classes.

    Args:
        model: the model (the root itself counts, under the name ``""``).
        sites: a glob (or list of globs) on qualified names; a glob naming a module
            selects every dropout module below it; None for all.

    Raises:
        TypeError: ``sites`` is not a string, a list of strings or None.
        ValueError: ``sites`` matches no dropout module (the message lists them).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(), torch.nn.Dropout2d())
        >>> list(dropout_layers(net)), list(dropout_layers(net, "2"))
        (['1', '2'], ['2'])
    """
    modules = {name: site.module for name, site in find_sites(model).items() if site.is_module}
    names = select(modules, check_patterns("sites", sites), "dropout module")
    return {name: modules[name] for name in names}


def set_dropout_p(model: nn.Module, p: float, sites: Patterns = None) -> dict[str, DropoutSite]:
    """Set the drop probability of the sites of ``model`` matching ``sites``.

    ``p`` is validated before any site changes. Sites whose rate is written in code
    cannot be set, and sites that learn their p (ConcreteDropout) are not set: both are
    named in a warning.

    Args:
        model: the model.
        p: the new drop probability in [0, 1].
        sites: a glob (or list of globs) on qualified site names, as in :func:`select_sites`.

    Returns:
        The sites that were set, by name.

    Raises:
        TypeError: ``p`` is not a number.
        ValueError: ``p`` outside [0, 1], ``sites`` matches nothing, or no matched site
            can be set.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Dropout())
        >>> list(set_dropout_p(net, 0.1, "1")), net[0].p, net[1].p
        (['1'], 0.5, 0.1)
    """
    p = check_probability("p", p)
    chosen = select_sites(model, sites)
    settable = {name: site for name, site in chosen.items() if site.settable and not site.learned}
    if not settable:
        where = "" if sites is None else f" matching {sites!r}"
        raise ValueError(f"{type(model).__name__} has no dropout site{where} whose p can be set")
    fixed = [name for name, site in chosen.items() if not site.settable]
    if fixed:
        warnings.warn(
            f"these dropout sites have their rate written in code and keep it: {fixed}", stacklevel=2
        )
    learned = [name for name, site in chosen.items() if site.learned]
    if learned:
        warnings.warn(f"these dropout sites learn their p and keep it: {learned}", stacklevel=2)
    for site in settable.values():
        site.set_p(p)
    return settable


@contextmanager
def sites_training(model: nn.Module, sites: Mapping[str, DropoutSite]) -> Iterator[None]:
    """Within the block ``sites`` drop: their gates are in training mode, every other
    module keeps its mode, and every module's mode is restored on exit (also on error).

    Only each gate's own ``training`` flag is set, never ``.train()`` (which would recurse
    into BatchNorm and the rest).

    Args:
        model: the model whose modes are restored on exit.
        sites: the sites to switch on.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        for site in sites.values():
            for gate in site.gates:
                gate.training = True
        yield
    finally:
        for m, training in modes:
            m.training = training


__all__ = ["dropout_layers", "select_sites", "set_dropout_p", "sites_training"]
