"""DropConnect (Wan et al., "Regularization of Neural Networks using DropConnect", ICML
2013): drop connections (weights) instead of units. :func:`drop_connect` masks a weight;
:class:`DropConnect` masks the named weights of a wrapped Linear, ConvNd, RNN, LSTM, GRU,
or anything else with weight parameters (used on the recurrent weights ``weight_hh_l*`` as
AWD-LSTM's "weight drop", Merity et al. 2018). Layers with the masking built in, per-sample
masks and Gaussian inference: :mod:`lightning_dropout.layers.drop_connect_layers`.

The wrapped module keeps its real parameters: each training forward computes masked
copies and runs the module with them (a Linear or convolution takes them as arguments;
any other module through :func:`torch.func.functional_call`, one call at a time, since it
swaps the parameters for the call), so gradients reach the real parameters, the parameter
count does not change, and cuDNN RNNs keep working. (The original AWD-LSTM WeightDrop
deleted the parameter and re-assigned a plain tensor, which broke ``flatten_parameters``
and lost gradients.) The wrapper's state_dict has the wrapped module's own keys, so
weights saved from the plain module load into the wrapped one and back.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_dropout import kernels
from lightning_dropout.layers.base import WeightMaskLayer, keep_wrapped_state_dict_keys
from lightning_dropout.layers.common import check_p, exact_output, p_equals


def drop_connect(weight: Tensor, p: float | Tensor = 0.5, training: bool = True) -> Tensor:
    """Return ``weight`` with each entry dropped w.p. ``p`` and the rest scaled by 1/(1-p).

    One mask for the whole call: the functional form of ``per_sample=False``.

    Args:
        weight: the weight tensor (gradients flow back to it).
        p: drop probability in [0, 1]: a float or a 0-d tensor (see
            :mod:`lightning_dropout.layers.common`).
        training: mask (True) or return ``weight`` unchanged (False).

    Raises:
        TypeError: ``p`` is not a number.
        ValueError: ``p`` is NaN or outside [0, 1].

    Example:
        >>> w = drop_connect(torch.ones(4, 3), p=0.5)
        >>> bool(((w == 0) | (w == 2)).all())
        True
    """
    p = check_p(p)
    if not training:
        return weight
    if (exact := exact_output(weight, p)) is not None:
        return exact
    # The element dispatch: its key is drawn outside its autograd Function, so under vmap a
    # weight shared by every element still gets a mask per element (randomness="different").
    return kernels.drop_elements(weight, p)


_FUNCTIONAL_CALL = threading.Lock()


def _direct_forward(module: nn.Module, masked: dict[str, Tensor]) -> Callable[[Tensor], Tensor] | None:
    """The forward of a Linear or a convolution with the masked weights passed as arguments
    (the module itself untouched), or None for any other module."""
    if not set(masked) <= {"weight", "bias"}:
        return None
    weight = masked.get("weight", cast(Tensor, module.weight))
    bias = masked.get("bias", cast(Tensor | None, module.bias))
    if type(module) is nn.Linear:
        return lambda x: F.linear(x, weight, bias)
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        conv = cast(nn.Conv2d, module)
        return lambda x: conv._conv_forward(x, weight, bias)
    return None


class DropConnect(WeightMaskLayer, nn.Module):
    """Wrap ``module`` so that its ``names`` weights are dropped in training.

    One mask per forward call (for an RNN: the same mask at every time step), inverted
    scaling; the identity wrapper in evaluation. ``mask_groups`` (set by Monte-Carlo
    inference, see :class:`~lightning_dropout.layers.WeightMaskLayer`) splits dimension 0
    of the first input into that many groups with independent masks; this needs a module
    that maps one batch-first tensor to one tensor (Linear, ConvNd).

    Args:
        module: the module whose weights to drop.
        p: probability of dropping each weight, in [0, 1]; may be reassigned.
        names: parameter names of ``module`` to mask (dotted names reach submodules).

    Raises:
        TypeError: ``module`` is not an nn.Module or ``names`` not a sequence of strings.
        ValueError: ``p`` outside [0, 1], ``names`` empty, or a name that is not a
            floating-point parameter of ``module`` (the message lists those that are).

    Example:
        >>> lstm = DropConnect(torch.nn.LSTM(4, 8), p=0.5, names=("weight_hh_l0",))
        >>> out, _ = lstm(torch.randn(5, 2, 4))
        >>> out.shape, sum(p.numel() for p in lstm.parameters()) == 4 * 8 * (4 + 8 + 2)
        (torch.Size([5, 2, 8]), True)
        >>> sorted(lstm.state_dict())[:2]
        ['bias_hh_l0', 'bias_ih_l0']
    """

    site_kind = "dropconnect"

    def __init__(self, module: nn.Module, p: float = 0.5, names: Sequence[str] = ("weight",)) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be a sequence of parameter names, got {names!r}")
        if not names:
            raise ValueError("names must name at least one parameter, got an empty sequence")
        available = {n for n, t in module.named_parameters() if t.is_floating_point()}
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"names {unknown} are not parameters of {type(module).__name__}; it has {sorted(available)}"
            )
        self.module = module
        self._init_weight_mask(p)
        self.names = tuple(names)
        keep_wrapped_state_dict_keys(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        p = self.forward_p
        if not self.training or p_equals(p, 0.0):
            return self.module(*args, **kwargs)
        if self.mask_groups > 1:
            return self._grouped_forward(p, *args, **kwargs)
        return self._masked_call(p, args, kwargs)

    def _masked_call(self, p: float | Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        params = dict(self.module.named_parameters())
        masked = {n: drop_connect(params[n], p) for n in self.names}
        direct = _direct_forward(self.module, masked)
        if direct is not None and len(args) == 1 and not kwargs:
            return direct(args[0])
        # functional_call swaps the module's parameters for the call: other threads calling
        # (or reading) the module meanwhile would see the masked copies.
        with _FUNCTIONAL_CALL, warnings.catch_warnings():
            # cuDNN RNNs warn on every call that masked weights are not one contiguous
            # chunk; that is inherent to weight masking and costs one copy, not an error.
            warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
            return functional_call(self.module, masked, args, kwargs)

    def _grouped_forward(self, p: float | Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.module, nn.RNNBase) or not args or not isinstance(args[0], Tensor):
            raise NotImplementedError(
                f"DropConnect: independent masks per group (mask_groups={self.mask_groups}) need a module "
                f"mapping one batch-first tensor to a tensor, not {type(self.module).__name__}; "
                "use looped Monte-Carlo inference (batched=False) for this model"
            )
        x, rest = args[0], args[1:]
        chunks = x.chunk(self.mask_groups) if x.shape[0] % self.mask_groups == 0 else None
        if chunks is None or len(chunks) != self.mask_groups:
            raise ValueError(f"batch size {x.shape[0]} is not a multiple of mask_groups {self.mask_groups}")
        return torch.cat([self._masked_call(p, (c, *rest), kwargs) for c in chunks])

    def extra_repr(self) -> str:
        return f"p={self.p}, names={list(self.names)}"
