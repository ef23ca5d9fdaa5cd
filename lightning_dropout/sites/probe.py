"""Watch dropout that happens through function calls, attributed to its site.

A dropout module can be watched with forward hooks. Dropout that a module's code does by
calling a function (``F.dropout(x, p=self.drop_rate, training=self.training)`` in timm's
heads and BART's layers, transformers' eager attention) has no module of its own.
:class:`FunctionalProbe` sees those calls while it is open: a ``TorchFunctionMode`` is
handed every torch function call, and global forward hooks keep the stack of running
modules, so a call is attributed to the innermost running module and, among that
module's sites, to the one whose rate equals the ``p`` the call received (sites with
equal rates share the observation).

``scaled_dot_product_attention`` drops attention probabilities inside its fused kernel,
where no mask can be seen. A call with ``dropout_p > 0`` made for a watched site is
therefore evaluated in math form while the probe is open (:func:`attention_in_math_form`:
torch's reference computation, softmax of the scaled scores, dropout with the same ``p``,
times the values), whose dropout is observed like any other. The result has the fused
kernel's distribution and gradients, with other random numbers; it holds the
``[..., L, S]`` attention matrix, as eager attention does. Dropout inside ``nn.LSTM``'s
kernel stays invisible.

Every torch call while the probe is open goes through Python, so open it only for the
steps you measure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_dropout.sites.site import DropoutSite

# Dropout functions: (name of the training argument, its position, whether the map is
# affine rather than a mask times the input). p is argument 1 in all.
DROP_CALLS: dict[Callable[..., Any], tuple[str, int, bool]] = {
    F.dropout: ("training", 2, False),
    F.dropout1d: ("training", 2, False),
    F.dropout2d: ("training", 2, False),
    F.dropout3d: ("training", 2, False),
    F.alpha_dropout: ("training", 2, True),
    F.feature_alpha_dropout: ("training", 2, True),
    torch.dropout: ("train", 2, False),
    torch.feature_dropout: ("train", 2, False),
    torch.alpha_dropout: ("train", 2, True),
    torch.feature_alpha_dropout: ("train", 2, True),
}
_SDPA_DROPOUT_POSITION = 4


def dropping_p(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """The drop probability of a call that drops: a dropout function in training mode, or
    ``scaled_dot_product_attention``, with p > 0; None for any other call.

    Example:
        >>> x = torch.ones(2)
        >>> dropping_p(F.dropout, (x, 0.3), {}), dropping_p(F.dropout, (x, 0.3, False), {})
        (0.3, None)
    """
    if not args or not isinstance(args[0], Tensor):
        return None
    spec = DROP_CALLS.get(func)
    if spec is not None:
        training_name, position, _ = spec
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[position] if len(args) > position else kwargs.get(training_name, True)
        if not training:
            return None
    elif func is F.scaled_dot_product_attention:
        positional = args[_SDPA_DROPOUT_POSITION] if len(args) > _SDPA_DROPOUT_POSITION else 0.0
        p = kwargs.get("dropout_p", positional)
    else:
        return None
    return float(p) if isinstance(p, (int, float)) and p > 0 else None


def _attention_arguments(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, float, bool, float | None, bool]:
    """``scaled_dot_product_attention``'s arguments, bound by its signature."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def attention_in_math_form(
    args: tuple[Any, ...], kwargs: dict[str, Any], dropout: Callable[[Tensor], Tensor]
) -> Tensor:
    """``scaled_dot_product_attention(*args, **kwargs)`` computed as torch documents it, with
    the attention probabilities dropped by ``dropout(probs)`` instead of inside a kernel.

    Rows that mask every key give zeros, as torch's kernels do.

    Example:
        >>> q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
        >>> fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> math_form = attention_in_math_form((q, k, v), {"is_causal": True}, lambda probs: probs)
        >>> torch.allclose(fused, math_form, atol=1e-6)
        True
    """
    query, key, value, mask, _, is_causal, scale, enable_gqa = _attention_arguments(*args, **kwargs)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    allowed: Tensor | None = None
    if is_causal:
        length, keys = query.shape[-2], key.shape[-2]
        allowed = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask if allowed is None else allowed & mask
        else:
            scores = scores + mask
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # A row masking every key: zeros, with zero gradients rather than NaN.
    blocked = scores.isneginf().all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(blocked, 0.0), dim=-1).masked_fill(blocked, 0.0)
    return dropout(probs) @ value


class RunningModules:
    """The stack of modules whose forward is running, kept by global forward hooks while
    open: which module's code makes a call seen by a ``TorchFunctionMode``."""

    def __init__(self) -> None:
        self.stack: list[nn.Module] = []
        self._handles: list[RemovableHandle] = []

    def open(self) -> None:
        self.stack = []
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._enter),
            nn.modules.module.register_module_forward_hook(self._leave, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.stack = []

    @property
    def innermost(self) -> nn.Module | None:
        return self.stack[-1] if self.stack else None

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()


#: ``observe(site, x)`` is called with the input of a dropout call made for ``site``
#: before the call runs; it may return a function that is then called with the output.
Observer = Callable[[DropoutSite, Tensor], Callable[[Tensor], None] | None]


def function_sites(sites: Mapping[str, DropoutSite]) -> dict[nn.Module, list[DropoutSite]]:
    """The sites a module's code may drop through a function call, by that module.

    Every site that is not a module, and every dropout module whose rate another module's
    code reads (BERT's attention dropout: ``self.dropout.p`` handed to the attention).

    Example:
        >>> class Head(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(3, 3)
        ...         self.drop_rate = 0.2
        ...     def forward(self, x):
        ...         return torch.nn.functional.dropout(self.fc(x), p=self.drop_rate, training=self.training)
        >>> from lightning_dropout.sites import find_sites
        >>> head = Head()
        >>> function_sites(find_sites(head))[head]
        [DropoutSite('drop_rate', kind='dropout', p=0.2)]
    """
    owners: dict[nn.Module, list[DropoutSite]] = {}
    for site in sites.values():
        callers = [g for g in site.gates if g is not site.module] if site.is_module else [site.module]
        for caller in callers:
            owners.setdefault(caller, []).append(site)
    return owners


class FunctionalProbe:
    """While open, hand every functional dropout call made for one of ``sites`` to ``observe``.

    Args:
        sites: the sites to watch (calls for other sites pass untouched).
        observe: see :data:`Observer`.

    Example:
        >>> from lightning_dropout.sites import find_sites
        >>> class Head(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(3, 3)
        ...         self.drop_rate = 0.2
        ...     def forward(self, x):
        ...         return torch.nn.functional.dropout(self.fc(x), p=self.drop_rate, training=self.training)
        >>> head, seen = Head(), []
        >>> with FunctionalProbe(find_sites(head), lambda site, x: seen.append((site.name, x.shape))):
        ...     _ = head(torch.ones(2, 3))
        >>> seen
        [('drop_rate', torch.Size([2, 3]))]
    """

    def __init__(self, sites: Mapping[str, DropoutSite], observe: Observer) -> None:
        self.owners = function_sites(sites)
        self.observe = observe
        self._running = RunningModules()
        self._mode: _DropCallMode | None = None

    def __enter__(self) -> FunctionalProbe:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def open(self) -> None:
        """Start watching (a no-op when already open or when no site can be called for)."""
        if self._mode is not None or not self.owners:
            return
        self._running.open()
        self._mode = _DropCallMode(self)
        self._mode.__enter__()

    def remove(self) -> None:
        """Stop watching (idempotent, so it can serve as a hook handle)."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._running.remove()

    def sites_for(self, p: float) -> list[DropoutSite]:
        """The watched sites a dropout call with rate ``p`` made now belongs to."""
        innermost = self._running.innermost
        candidates = self.owners.get(innermost) if innermost is not None else None
        if not candidates:
            return []
        matching = [site for site in candidates if site.p is not None and abs(site.p - p) <= 1e-12]
        return matching or [site for site in candidates if site.p is None]


class _DropCallMode(TorchFunctionMode):
    def __init__(self, probe: FunctionalProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        # Alpha dropout sets no zeros: nothing to observe there.
        attention = func is F.scaled_dot_product_attention
        seen = attention or (func in DROP_CALLS and not DROP_CALLS[func][2])
        p = dropping_p(func, args, kwargs) if seen else None
        sites = self.probe.sites_for(p) if p is not None else []
        if not sites:
            return func(*args, **kwargs)
        if attention:
            if any(isinstance(a, Tensor) and a.is_nested for a in args[:3]):
                return func(*args, **kwargs)  # no math form for nested tensors
            rate = p

            def drop(probs: Tensor) -> Tensor:
                return self._observed(sites, torch.dropout, (probs, rate, True), {})

            return attention_in_math_form(args, kwargs, drop)
        return self._observed(sites, func, args, kwargs)

    def _observed(
        self,
        sites: list[DropoutSite],
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        finishes = [self.probe.observe(site, args[0]) for site in sites]
        out = func(*args, **kwargs)
        for finish in finishes:
            if finish is not None:
                finish(out)
        return out


__all__ = [
    "DROP_CALLS",
    "FunctionalProbe",
    "Observer",
    "RunningModules",
    "attention_in_math_form",
    "dropping_p",
    "function_sites",
]
