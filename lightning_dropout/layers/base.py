"""What every dropout-family layer of this package shares: a validated, mutable ``p``."""

from __future__ import annotations

import struct
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_dropout._validation import check_probability


def check_floating(x: Tensor, name: str = "input") -> None:
    """Raise a TypeError unless ``x`` is a floating-point tensor.

    Raises:
        TypeError: ``x`` is not a tensor, or its dtype is not floating point.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


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
    that follows the module across devices but stays out of the ``state_dict``. Under
    torch.compile the layers read that tensor (see
    :mod:`lightning_dropout.layers.traceable`), so a ``p`` that changes between steps is a
    graph input instead of a constant that forces a recompile. The buffer holds the
    float64's bits as an int64 because ``Module.to(dtype)`` and ``.half()`` cast every
    floating-point buffer: a bf16 mirror would turn ``p = 0.3`` into 0.30078.
    """

    #: What the layer drops, as a dropout site (see :mod:`lightning_dropout.sites`).
    site_kind: ClassVar[str] = "dropout"
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
