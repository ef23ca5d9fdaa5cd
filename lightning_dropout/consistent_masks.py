"""Consistent Monte-Carlo masks: each replica is one fixed sub-network for every input.

Plain MC dropout draws fresh masks for every row of every batch, so the passes are
different random networks for different inputs. With consistent masks (as baal's
consistent MC dropout), replica ``r`` of a Monte-Carlo run applies the same masks to every
input it sees: its masks are a function of ``(seed, r, site)`` and of the shape of one
input, never of the batch, the batch size, the chunking or the batched / looped mode. No
mask is stored: it is drawn again, identically, whenever it is needed.

How, without touching any layer's code. Every draw of a site happens in a seeded scope:
torch's global generators (CPU, and the CUDA one of the input's device) are reseeded with
a hash of ``(seed, replica, site, call)`` and restored afterwards, so the caller's random
stream is left exactly as it was. Then, per kind of site:

* a dropout module that draws a mask per row (dropout, channel, Gaussian, alpha,
  drop-path, drop-block modules; this package's layers, torch's, timm's): its forward is
  replaced, for the run, by one that calls the module's own forward on a batch of one
  (ones, and zeros for alpha dropout, whose map is affine) in the replica's scope and
  applies the resulting mask to every row. The module's own semantics (inverted scaling,
  channel masks, drop-path scaling) are kept because its own code draws the mask;
* a module that draws one mask per call (a
  :class:`~lightning_dropout.layers.WeightMaskLayer`: DropConnect's layers and wrapper,
  EmbeddingDropout; per-sample or grouped masks set aside for the run by its
  ``one_mask_per_call``), or one whose input is not floating point: its forward runs once
  per replica, on that replica's rows, in the replica's scope;
* dropout that a module's code does by calling a function (``F.dropout`` and the
  channel and alpha variants, ``torch.dropout``; transformers' eager attention, timm's
  heads) and attention dropout handed to ``scaled_dot_product_attention``: a
  ``TorchFunctionMode`` sees the call and gives it the replica's mask (SDPA is then computed
  in its documented math form, softmax, masked, times the values, since the fused kernels
  draw their mask internally). The call is named by the running module, the function and
  its index among that module's calls in the pass, so a dropout module called twice in a
  forward gets two independent masks.

What cannot be made consistent, and is named in a warning (its masks stay independent per
row): ``nn.LSTM`` / ``GRU`` / ``RNN`` dropout between layers and ``nn.MultiheadAttention``
dropout (both drawn inside fused functions), LayerDrop (one draw that decides for the whole
batch), ``PatchDropout`` (keeps a random subset of tokens, per row), and drop-path or
drop-block done by calling a function rather than a module. Any other draw from torch's
generators during a pass (a site the package does not know) is detected after the pass
and reported too.

Dimension 0 of a site's input is taken as the batch (as batched MC already requires).
Masks depend on the shape of one input: inputs of one shape share a replica's masks
(for attention: one mask per sequence length).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_dropout._validation import check_int
from lightning_dropout.layers import WeightMaskLayer
from lightning_dropout.random_streams import default_generators, mix_seed
from lightning_dropout.sites import DropoutSite, function_sites
from lightning_dropout.sites.probe import DROP_CALLS, RunningModules, dropping_p

_INPLACE_POSITION = 3

_UNSUPPORTED_KINDS = {
    "rnn": "drawn inside the fused RNN kernel",
    "layer_drop": "one draw decides for the whole batch",
    "patch_dropout": "keeps a random subset of tokens per row",
}


def inconsistent_sites(sites: Mapping[str, DropoutSite]) -> dict[str, str]:
    """The sites whose masks cannot be made consistent, with the reason for each.

    Example:
        >>> from lightning_dropout.sites import find_sites
        >>> inconsistent_sites(find_sites(torch.nn.LSTM(4, 4, num_layers=2, dropout=0.2)))
        {'dropout': 'drawn inside the fused RNN kernel'}
    """
    reasons: dict[str, str] = {}
    for name, site in sites.items():
        if site.kind in _UNSUPPORTED_KINDS:
            reasons[name] = _UNSUPPORTED_KINDS[site.kind]
        elif isinstance(site.module, nn.MultiheadAttention) and not site.is_module:
            reasons[name] = "drawn inside nn.MultiheadAttention's fused function"
        elif not site.is_module and site.kind in ("drop_path", "drop_block"):
            reasons[name] = f"{site.kind} done by a function the package cannot intercept"
    return reasons


def _key(text: str) -> int:
    # A stable hash (Python's hash() of a str changes between processes).
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class ConsistentMasks:
    """While entered, replica ``r`` of each pass applies the masks of ``(seed, r)`` to every input.

    Enter it around the passes, and open :meth:`replicas` around each forward call with
    the replicas that call holds (``count`` replicas stacked replica-major along dim 0).
    The sites must already drop (:func:`~lightning_dropout.mc.mc_dropout`).

    Args:
        model: the model whose sites these are (for the names of running modules).
        sites: the sites to make consistent.
        seed: the masks' seed; the same seed gives the same sub-networks.

    Attributes:
        inconsistent: the sites that cannot be made consistent, with the reason (sites
            at p = 0 left out: they drop nothing).
        stray_draws: whether a pass drew from torch's generators outside the consistent
            masks and outside the sites that cannot be made consistent (dropout the package
            does not know about, or other random code in the forward).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
        >>> from lightning_dropout.sites import find_sites
        >>> masks = ConsistentMasks(net, find_sites(net), seed=0)
        >>> x = torch.randn(3, 4)
        >>> with masks, masks.replicas(0, 1):
        ...     a = net(x) != 0
        >>> with masks, masks.replicas(0, 1):
        ...     b = net(x[:1]) != 0
        >>> bool((a == a[0]).all()), torch.equal(a[:1], b)
        (True, True)
    """

    def __init__(self, model: nn.Module, sites: Mapping[str, DropoutSite], seed: int) -> None:
        self.seed = check_int("seed", seed)
        unsupported = inconsistent_sites(sites)
        self.inconsistent = {name: why for name, why in unsupported.items() if sites[name].p != 0.0}
        # Those sites draw (even at p = 0: LayerDrop draws its number before comparing it
        # with p), so their draws are no sign of an unknown one.
        self._expect_draws = bool(unsupported)
        self.stray_draws = False
        self._names = {id(module): name for name, module in model.named_modules()}
        self._module_sites = {
            name: site
            for name, site in sites.items()
            if site.is_module and site.kind not in _UNSUPPORTED_KINDS
        }
        self._needs_calls = bool(function_sites(sites))
        self._start = 0
        self._count = 1
        self._calls: Counter[tuple[str, str]] = Counter()
        self._probing = 0
        self._running = RunningModules()
        self._mode: _ConsistentCalls | None = None
        self._patched: list[nn.Module] = []

    def __enter__(self) -> ConsistentMasks:
        for name, site in self._module_sites.items():
            module = site.module
            if any(module is patched for patched in self._patched):
                continue  # a module that is two sites: one replacement draws for both
            if "forward" in vars(module):
                # Replaced on the instance by someone else: replacing it again could undo theirs.
                self.inconsistent[name] = "its forward is replaced on the instance"
                continue
            module.forward = self._module_forward(name, site, module.forward)
            self._patched.append(module)
        if self._needs_calls:
            self._running.open()
            self._mode = _ConsistentCalls(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._running.remove()
        for module in self._patched:
            vars(module).pop("forward", None)
        self._patched = []

    @contextmanager
    def replicas(self, start: int, count: int) -> Iterator[None]:
        """One forward call holding replicas ``start .. start + count - 1`` (replica-major).

        Raises:
            ValueError: ``start`` below 0 or ``count`` below 1.
        """
        if start < 0 or count < 1:
            raise ValueError(f"replicas need start >= 0 and count >= 1, got {start} and {count}")
        self._start, self._count = start, count
        self._calls.clear()
        self._running.stack.clear()
        generators = [torch.default_generator]
        if torch.cuda.is_initialized():
            generators.append(torch.cuda.default_generators[torch.cuda.current_device()])
        before = [generator.get_state() for generator in generators]
        try:
            yield
        finally:
            after = [generator.get_state() for generator in generators]
            changed = not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            self.stray_draws = self.stray_draws or (changed and not self._expect_draws)

    # -- the seeded scope ---------------------------------------------------------------

    @contextmanager
    def _scope(self, key: int, replica: int, device: torch.device) -> Iterator[None]:
        generators = default_generators([device] if device.type == "cuda" else [])
        states = [generator.get_state() for generator in generators]
        seed = mix_seed(self.seed, replica, key)
        self._probing += 1
        try:
            for generator in generators:
                generator.manual_seed(seed)
            yield
        finally:
            self._probing -= 1
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state)

    def _call_key(self, owner: str, what: str) -> int:
        index = self._calls[(owner, what)]
        self._calls[(owner, what)] += 1
        return _key(f"{owner}\x00{what}\x00{index}")

    def _split(self, x: Tensor) -> int:
        rows = x.shape[0] if x.dim() else 0
        if rows % self._count:
            raise ValueError(
                f"consistent masks: a dropout site received {rows} rows, not a multiple of the "
                f"{self._count} replicas of the pass; the model does not keep the batch along dim 0 "
                "(use batched=False)"
            )
        return rows // self._count

    def mask_rows(self, x: Tensor, key: int, draw: Callable[[Tensor], Tensor], affine: bool) -> Tensor:
        """``x`` with each replica's rows mapped as ``draw`` maps a batch of one.

        ``draw`` is the site's own dropping code; it runs on ones (and zeros when the map
        is ``affine``) of shape ``(1, *x.shape[1:])`` in each replica's scope.
        """
        rows = self._split(x)
        shape = (1, *x.shape[1:])
        scales, shifts = [], []
        for replica in range(self._start, self._start + self._count):
            with self._scope(key, replica, x.device):
                one = draw(torch.ones(shape, dtype=x.dtype, device=x.device))
            if affine:
                with self._scope(key, replica, x.device):
                    zero = draw(torch.zeros(shape, dtype=x.dtype, device=x.device))
                one = one - zero
                shifts.append(zero)
            scales.append(one)
        grouped = x.reshape(self._count, rows, *x.shape[1:]) * torch.stack(scales)
        if affine:
            grouped = grouped + torch.stack(shifts)
        return grouped.reshape(x.shape)

    def call_per_replica(self, x: Tensor, key: int, call: Callable[[Tensor], Any]) -> Any:
        """``call`` once per replica on its rows, in the replica's scope, outputs concatenated."""
        rows = self._split(x) if self._count > 1 else 0
        outputs = []
        for index in range(self._count):
            part = x if self._count == 1 else x[index * rows : (index + 1) * rows]
            with self._scope(key, self._start + index, x.device):
                outputs.append(call(part))
        if self._count == 1:
            return outputs[0]
        if not all(isinstance(out, Tensor) for out in outputs):
            raise TypeError("consistent masks: a DropConnect module returned a non-tensor; use batched=False")
        return torch.cat(outputs)

    # -- module sites ---------------------------------------------------------------------

    def _module_forward(
        self, name: str, site: DropoutSite, original: Callable[..., Any]
    ) -> Callable[..., Any]:
        module = site.module
        one_mask = module.one_mask_per_call if isinstance(module, WeightMaskLayer) else nullcontext

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not module.training or not args or not isinstance(args[0], Tensor) or self._probing:
                return original(*args, **kwargs)
            x, rest = args[0], args[1:]
            key = self._call_key(name, "forward")
            if isinstance(module, WeightMaskLayer) or not x.is_floating_point():
                with one_mask():
                    return self.call_per_replica(x, key, lambda part: original(part, *rest, **kwargs))
            return self.mask_rows(
                x, key, lambda probe: original(probe, *rest, **kwargs), site.kind == "alpha"
            )

        return forward

    # -- function calls -------------------------------------------------------------------

    def _owner(self) -> str:
        module = self._running.innermost
        if module is None:
            return ""
        return self._names.get(id(module), type(module).__qualname__)

    def dropout_call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A dropout function's call, with the replicas' masks."""
        key = self._call_key(self._owner(), getattr(func, "__name__", repr(func)))
        affine = DROP_CALLS[func][2]
        rest, options = list(args[1:]), dict(kwargs)
        if len(rest) >= _INPLACE_POSITION:
            rest[_INPLACE_POSITION - 1] = False
        if "inplace" in options:
            options["inplace"] = False
        return self.mask_rows(args[0], key, lambda probe: func(probe, *rest, **options), affine)

    def attention_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``scaled_dot_product_attention`` in its math form, with the replicas' masks."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        given = dict(zip(names, args, strict=False)) | kwargs
        query, key, value = given["query"], given["key"], given["value"]
        p = float(given["dropout_p"])
        if given.get("enable_gqa", False):
            repeats = query.size(-3) // key.size(-3)
            key = key.repeat_interleave(repeats, -3)
            value = value.repeat_interleave(repeats, -3)
        scale = given.get("scale")
        scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
        scores = query @ key.transpose(-2, -1) * scale
        length, source = query.size(-2), key.size(-2)
        if given.get("is_causal", False):
            causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        mask = given.get("attn_mask")
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        call_key = self._call_key(self._owner(), "scaled_dot_product_attention")
        weights = self.mask_rows(weights, call_key, lambda probe: F.dropout(probe, p, True), False)
        return weights @ value


class _ConsistentCalls(TorchFunctionMode):
    def __init__(self, masks: ConsistentMasks) -> None:
        super().__init__()
        self.masks = masks

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        p = None if self.masks._probing else dropping_p(func, args, kwargs)
        if p is None:
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self.masks.attention_call(args, kwargs)
        return self.masks.dropout_call(func, args, kwargs)


__all__ = ["ConsistentMasks", "inconsistent_sites"]
