"""What every dropout-family layer of this package shares: a validated, mutable ``p``; and
what the layers that drop weights share: one mask per call, for groups of the batch."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_dropout._validation import check_positive_int, check_probability


def _float64_bits(value: float) -> int:
    """The IEEE-754 bits of ``value`` as a float64, read as a signed 64-bit integer."""
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


class DropProbability:
    """Mixin of every dropout-family layer of this package: a validated, mutable ``p``.

    ``p`` (the probability of dropping) is a plain attribute that may change between
    steps, as a scheduler does; every assignment is validated. Being an instance of this
    class is what makes a module one of this package's dropout layers.

    ``p`` is mirrored on the layer's device: :attr:`p_tensor` is ``p`` as a 0-d float64
    tensor, read from a non-persistent buffer (registered by :meth:`_register_p_tensor`)
    that follows the module across devices but stays out of the ``state_dict``. A layer's
    ``forward`` passes :attr:`forward_p` to its function: the float, or while torch.compile
    traces, that tensor, so a ``p`` that changes between steps is a graph input instead of
    a constant that forces a recompile (see :mod:`lightning_dropout.layers.common`). The
    buffer holds the float64's bits as an int64 because ``Module.to(dtype)`` and ``.half()``
    cast every floating-point buffer: a bf16 mirror would turn ``p = 0.3`` into 0.30078.
    """

    #: What the layer drops, as a dropout site (see :mod:`lightning_dropout.sites`).
    site_kind: ClassVar[str] = "dropout"
    #: Whether training sets ``p`` (ConcreteDropout): a scheduler then leaves it alone.
    learned_p: ClassVar[bool] = False
    _p: float
    p_bits: Tensor

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = check_probability("p", value)
        buffer = getattr(self, "p_bits", None)
        if buffer is None:
            return
        bits = _float64_bits(self._p)
        if buffer.is_inference() and not torch.is_inference_mode_enabled():
            # A layer built under inference_mode holds an inference tensor, which cannot be
            # updated in place outside it.
            self.p_bits = torch.full((), bits, dtype=torch.int64, device=buffer.device)
        else:
            buffer.fill_(bits)  # a buffer without grad: no autograd bookkeeping needed

    @property
    def p_tensor(self) -> Tensor:
        """``p`` as a 0-d float64 tensor on the layer's device (a view, no copy)."""
        return self.p_bits.view(torch.float64)

    @property
    def forward_p(self) -> float | Tensor:
        """``p`` as ``forward`` passes it on: :attr:`p`, or :attr:`p_tensor` under torch.compile."""
        return self.p_tensor if torch.compiler.is_compiling() else self.p

    def _register_p_tensor(self) -> None:
        assert isinstance(self, nn.Module)
        self.register_buffer("p_bits", torch.zeros((), dtype=torch.int64), persistent=False)


class DropoutBase(DropProbability, nn.Module):
    """Base of this package's activation-dropping layers.

    Args:
        p: drop probability in [0, 1].

    Raises:
        TypeError: ``p`` is not a real number.
        ValueError: ``p`` is NaN or outside [0, 1].
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self._register_p_tensor()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextmanager
def _attributes(module: object, **values: Any) -> Iterator[None]:
    """Set attributes of ``module`` for the block, then restore them (after an exception too)."""
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class WeightMaskLayer(DropProbability):
    """Base of the layers that drop weights: one mask per call, for groups of the batch.

    DropConnect (:class:`~lightning_dropout.DropConnectLinear`, the convolutions and the
    :class:`~lightning_dropout.DropConnect` wrapper) and
    :class:`~lightning_dropout.EmbeddingDropout` mask weights that every sample of a batch
    reads, so a forward call draws one mask for the whole batch, unlike activation dropout,
    whose masks differ per sample. ``mask_groups`` (default 1) splits the batch (dim 0)
    into that many equal groups with masks of their own: Monte-Carlo inference sets it
    through :meth:`independent_groups` so that replicas of an input stacked along the batch
    are independent passes.
    """

    mask_groups: int

    def _init_weight_mask(self, p: float) -> None:
        self._register_p_tensor()
        self.p = p
        self.mask_groups = 1

    @contextmanager
    def independent_groups(self, groups: int) -> Iterator[None]:
        """Within the block, each of ``groups`` equal groups of the batch gets masks of its own.

        A layer that draws a mask per sample already does, and is left as it is. Raises
        ValueError for ``groups`` < 1.
        """
        with _attributes(self, **self._group_attributes(check_positive_int("groups", groups))):
            yield

    @contextmanager
    def one_mask_per_call(self) -> Iterator[None]:
        """Within the block, a call draws one mask for its whole batch (a layer that draws
        masks per sample or per group draws one)."""
        with _attributes(self, **self._one_mask_attributes()):
            yield

    def _group_attributes(self, groups: int) -> dict[str, Any]:
        return {"mask_groups": groups}

    def _one_mask_attributes(self) -> dict[str, Any]:
        return {"mask_groups": 1}


@runtime_checkable
class DropCounter(Protocol):
    """A layer whose drops are not zeros of a float input counts them itself.

    :class:`~lightning_dropout.callbacks.DropRateMonitor` measures a realised drop rate
    through :meth:`drop_counts` where a layer has it (ConcreteDropout's relaxed mask,
    EmbeddingDropout's token indices).
    """

    def drop_counts(self, input: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(dropped, observed)`` of one forward from its input and output."""
        ...


def keep_wrapped_state_dict_keys(wrapper: nn.Module) -> None:
    """Give ``wrapper`` (holding its module as ``wrapper.module``) that module's own
    ``state_dict`` keys, so weights saved from the plain module load into the wrapped one
    and back."""
    wrapper.register_state_dict_post_hook(_strip_wrapper_prefix)
    wrapper.register_load_state_dict_pre_hook(_add_wrapper_prefix)


_WRAPPED = "module."


def _strip_wrapper_prefix(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + key[len(prefix + _WRAPPED) :]] = state_dict.pop(key)


def _add_wrapper_prefix(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + _WRAPPED + key[len(prefix) :]] = state_dict.pop(key)
