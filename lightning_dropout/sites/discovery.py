"""Find every dropout site of a model: dropout modules, rates read in code, written rates.

Three rules, applied to every module of ``model.named_modules()``:

1. **Dropout modules, by type**: this package's layers, torch's (``nn.Dropout`` and the
   rest of ``_DropoutNd``, ``AlphaDropout``, ``FeatureAlphaDropout``), timm's
   ``DropPath`` / ``DropBlock2d`` / ``PatchDropout``, torchvision's ``StochasticDepth``
   (recognised by their qualified class names, so neither library is imported), and any
   class registered with :func:`register_dropout_module`.
2. **torch modules with a rate attribute**: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``
   (``dropout`` between stacked layers) and ``nn.MultiheadAttention`` (``dropout`` on the
   attention weights). ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` gate the sites
   inside them: in eval mode they take a fused path that skips dropout.
3. **Rates in a module's own code** (:mod:`lightning_dropout.sites.code`): a leaf module
   whose code drops at a rate of its own (``drop_path(x, self.drop_prob, self.training)``
   in the many copies of timm's DropPath) is a dropout module; otherwise a rate
   expression reading ``self.<attribute>`` makes that attribute a site when it holds a
   number in [0, 1] (``self.attention_dropout``, ``self.drop_rate``, ``self.dropout``);
   reading ``self.<child>.p`` of a dropout module makes this module a gate of that site
   (``p if self.training else 0``); a rate written as a number is a site that cannot be
   set. A number-valued attribute whose name contains ``drop`` and that the code reads
   (``self.layerdrop``) is a site too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from functools import reduce

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_dropout.layers import DropProbability
from lightning_dropout.sites.code import RateUse, class_code
from lightning_dropout.sites.site import SITE_KINDS, DropoutSite, is_rate

#: Dropout modules of other libraries by qualified class name: (rate attribute, kind).
FOREIGN_MODULES: dict[str, tuple[str, str]] = {
    "timm.layers.drop.DropPath": ("drop_prob", "drop_path"),
    "timm.layers.drop.DropBlock2d": ("drop_prob", "drop_block"),
    "timm.layers.patch_dropout.PatchDropout": ("prob", "patch_dropout"),
    "timm.layers.patch_dropout.PatchDropoutWithIndices": ("prob", "patch_dropout"),
    "torchvision.ops.stochastic_depth.StochasticDepth": ("p", "drop_path"),
}
_TORCH_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.AlphaDropout, nn.FeatureAlphaDropout), "alpha"),
    ((nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), "channel"),
    ((_DropoutNd,), "dropout"),
)
# Rate attributes a module named by DropoutScheduler(extra_modules=...) may hold.
GENERIC_RATE_ATTRIBUTES = ("p", "drop_prob", "prob", "drop_rate")

_registered: dict[type[nn.Module], tuple[str, str]] = {}


def register_dropout_module(cls: type[nn.Module], attribute: str = "p", kind: str = "dropout") -> None:
    """Make every instance of ``cls`` (and of its subclasses) a dropout site.

    Args:
        cls: an ``nn.Module`` subclass that drops in its forward.
        attribute: the instance attribute holding its drop probability.
        kind: what it drops, one of :data:`~lightning_dropout.sites.SITE_KINDS`
            (``"drop_path"`` sites keep their depth profile when scheduled).

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass or ``attribute`` not a string.
        ValueError: ``attribute`` is not an identifier or ``kind`` is unknown.

    Example:
        >>> class ShakeDrop(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.p_drop = 0.2
        >>> register_dropout_module(ShakeDrop, "p_drop", kind="drop_path")
        >>> find_sites(torch.nn.Sequential(ShakeDrop()))["0"]
        DropoutSite('0', kind='drop_path', p=0.2)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(attribute, str):
        raise TypeError(f"attribute must be a string, got {type(attribute).__name__} {attribute!r}")
    if not attribute.isidentifier():
        raise ValueError(f"attribute must be an attribute name, got {attribute!r}")
    if kind not in SITE_KINDS:
        raise ValueError(f"kind must be one of {list(SITE_KINDS)}, got {kind!r}")
    _registered[cls] = (attribute, kind)


def module_rate(module: nn.Module) -> tuple[str, str] | None:
    """``(rate attribute, kind)`` if ``module`` is a dropout module, else None.

    Example:
        >>> module_rate(torch.nn.Dropout2d()), module_rate(torch.nn.Linear(2, 2))
        (('p', 'channel'), None)
    """
    if isinstance(module, DropProbability):
        return "p", module.site_kind
    for types, kind in _TORCH_KINDS:
        if isinstance(module, types):
            return "p", kind
    for cls in type(module).__mro__:
        if cls in _registered:
            return _registered[cls]
        known = FOREIGN_MODULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if known is not None:
            return known
    return None


ModuleFilter = Callable[[str, nn.Module], bool]


def find_sites(model: nn.Module, include: ModuleFilter | None = None) -> dict[str, DropoutSite]:
    """Every dropout site of ``model``, by qualified name, in the order of their modules.

    Args:
        model: the model (the root's own sites have names without a module prefix).
        include: also treat the modules it accepts (name, module) as dropout modules when
            they hold a rate in one of :data:`GENERIC_RATE_ATTRIBUTES`
            (``DropoutScheduler(extra_modules=...)`` passes its extra_modules here).

    Example:
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.drop = torch.nn.Dropout(0.1)
        ...         self.lstm = torch.nn.LSTM(4, 4, num_layers=2, dropout=0.3)
        ...         self.attention_dropout = 0.2
        ...     def forward(self, q):
        ...         p = self.attention_dropout if self.training else 0.0
        ...         return self.drop(torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=p))
        >>> list(find_sites(Block()).values())  # doctest: +NORMALIZE_WHITESPACE
        [DropoutSite('attention_dropout', kind='attention', p=0.2),
         DropoutSite('drop', kind='dropout', p=0.1),
         DropoutSite('lstm.dropout', kind='rnn', p=0.3)]
    """
    modules = dict(model.named_modules())
    sites: dict[str, DropoutSite] = {}
    site_of: dict[int, str] = {}  # id(dropout module) -> its site's name
    for name, module in modules.items():
        rate = module_rate(module) or (_generic_rate(module) if include and include(name, module) else None)
        if rate is not None:
            attribute, kind = rate
            sites[name] = DropoutSite(name, kind, module, (module,), module, attribute, is_module=True)
            site_of[id(module)] = name
    for name, module in modules.items():
        if id(module) in site_of:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.RNNBase) and module.num_layers > 1:
            _add(sites, DropoutSite(f"{prefix}dropout", "rnn", module, (module,), module, "dropout"))
        elif isinstance(module, nn.MultiheadAttention):
            _add(sites, DropoutSite(f"{prefix}dropout", "attention", module, (module,), module, "dropout"))
        elif isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            pass  # gates its sites below, once they are all known
        elif not _is_torch_module(module):
            _add_code_sites(name, module, sites, site_of)
    for name, module in modules.items():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            prefix = f"{name}." if name else ""
            for site_name in [n for n in sites if n.startswith(prefix)]:
                _add_gate(sites, site_name, module)
    order = {id(module): index for index, module in enumerate(modules.values())}
    return dict(sorted(sites.items(), key=lambda item: order[id(item[1].module)]))


def _generic_rate(module: nn.Module) -> tuple[str, str] | None:
    for attribute in GENERIC_RATE_ATTRIBUTES:
        if is_rate(getattr(module, attribute, None)):
            return attribute, "dropout"
    return None


def _is_torch_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


def _add(sites: dict[str, DropoutSite], site: DropoutSite) -> None:
    sites.setdefault(site.name, site)


def _add_gate(sites: dict[str, DropoutSite], name: str, gate: nn.Module, kind: str | None = None) -> None:
    site = sites[name]
    gates = site.gates if any(g is gate for g in site.gates) else (*site.gates, gate)
    sites[name] = dataclasses.replace(site, gates=gates, kind=kind or site.kind)


def _add_code_sites(
    name: str, module: nn.Module, sites: dict[str, DropoutSite], site_of: dict[int, str]
) -> None:
    code = class_code(type(module))
    prefix = f"{name}." if name else ""
    gates = (module,) if code.reads_training else ()
    own_rate = _own_rate(module, code.uses)
    if own_rate is not None:
        # A leaf module dropping at a rate of its own (a copy of timm's DropPath, a custom
        # dropout class) is a dropout module.
        attribute, kind = own_rate
        _add(sites, DropoutSite(name, kind, module, gates, module, attribute, is_module=True))
        site_of[id(module)] = name
        return
    for use in code.uses:
        found = False
        for chain in use.chains:
            holder = _follow(module, chain[:-1])
            if holder is None:
                continue
            consumed = site_of.get(id(holder)) if isinstance(holder, nn.Module) else None
            if consumed is not None and sites[consumed].attribute == chain[-1]:
                # `self.attn_drop.p if self.training else 0.`: this module gates that site.
                _add_gate(sites, consumed, module, "attention" if use.kind == "attention" else None)
                found = True
            elif is_rate(getattr(holder, chain[-1], None)):
                _add(sites, DropoutSite(prefix + ".".join(chain), use.kind, module, gates, holder, chain[-1]))
                found = True
        if not found:
            # A rate written in the code, or computed from something that is not an attribute.
            site_name = f"{prefix}{use.function}@{use.line}"
            _add(sites, DropoutSite(site_name, use.kind, module, gates, written_p=use.written_p))
    for attribute in sorted(code.drop_names):
        value = getattr(module, attribute, None)
        if isinstance(value, float) and is_rate(value):
            kind = "layer_drop" if "layerdrop" in attribute.lower().replace("_", "") else "dropout"
            _add(sites, DropoutSite(prefix + attribute, kind, module, gates, module, attribute))


def _own_rate(module: nn.Module, uses: Iterable[RateUse]) -> tuple[str, str] | None:
    """``(attribute, kind)`` when ``module`` has no children and all its dropping calls
    use one rate attribute of its own."""
    if next(module.children(), None) is not None:
        return None
    rates = {(use.chains, use.kind) for use in uses}
    if len(rates) != 1:
        return None
    ((chains, kind),) = rates
    if len(chains) == 1 and len(chains[0]) == 1 and is_rate(getattr(module, chains[0][0], None)):
        return chains[0][0], kind
    return None


def _follow(root: object, path: Iterable[str]) -> object | None:
    """``root.a.b...`` for ``path``, or None if an attribute is missing."""
    try:
        return reduce(getattr, path, root)
    except AttributeError:
        return None


__all__ = [
    "FOREIGN_MODULES",
    "GENERIC_RATE_ATTRIBUTES",
    "find_sites",
    "module_rate",
    "register_dropout_module",
]
