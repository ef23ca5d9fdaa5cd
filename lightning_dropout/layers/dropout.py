"""Element dropout (Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks
from Overfitting", JMLR 2014), in its inverted and original variants.
"""

from __future__ import annotations

from torch import Tensor

from lightning_dropout import kernels
from lightning_dropout._validation import check_bool
from lightning_dropout.layers.base import DropoutBase
from lightning_dropout.layers.common import (
    check_floating,
    check_p,
    evaluation_output,
    exact_output,
    in_memory_order,
)


def dropout(
    x: Tensor,
    p: float | Tensor = 0.5,
    training: bool = True,
    inverted: bool = True,
    inplace: bool = False,
) -> Tensor:
    """Drop each element of ``x`` independently with probability ``p``.

    Inverted (default): kept elements are scaled by ``1 / (1 - p)`` in training and the
    function is the identity otherwise. Original (``inverted=False``): no scaling in
    training, ``x * (1 - p)`` otherwise. Either way the expected training output equals
    the evaluation output. ``p = 1`` gives exact zeros (and zero gradients), never NaN.

    Args:
        x: floating-point input of any shape.
        p: drop probability in [0, 1]: a float, or a 0-d tensor (as compiled layers pass
            it; see :mod:`lightning_dropout.layers.common`).
        training: draw a mask (True) or apply the evaluation rule (False).
        inverted: scale at training time (True) or at evaluation time (False).
        inplace: overwrite ``x``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``p`` is not a number.
        ValueError: ``p`` is NaN or outside [0, 1].

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = dropout(torch.ones(2, 4), p=0.75)
        >>> sorted(set(y.flatten().tolist())) in ([0.0], [4.0], [0.0, 4.0])
        True
    """
    check_floating(x)
    p = check_p(p)
    if not training:
        return evaluation_output(x, p, inverted, inplace)
    if (exact := exact_output(x, p, inplace)) is not None:
        return exact
    if not inplace and (memory_order := in_memory_order(x)) is not None:
        # elements are independent: drop them in memory order, so the output keeps x's layout
        view, back = memory_order
        return kernels.drop_elements(view, p, inverted).permute(back)
    return kernels.drop_elements(x, p, inverted, inplace)


class Dropout(DropoutBase):
    """Element dropout: each element is zeroed with probability ``p`` during training.

    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
    Overfitting", JMLR 2014. See :func:`dropout` for the two scaling variants.

    Args:
        p: drop probability in [0, 1]; may be reassigned between steps.
        inplace: overwrite the input.
        inverted: scale kept units by ``1 / (1 - p)`` in training (True, the usual form)
            or scale all units by ``1 - p`` in evaluation (False, the paper's original).

    Raises:
        TypeError: ``p`` is not a number, or ``inplace`` / ``inverted`` not bools.
        ValueError: ``p`` is NaN or outside [0, 1].

    Example:
        >>> layer = Dropout(p=0.75)
        >>> y = layer(torch.ones(3, 5))
        >>> bool(((y == 0) | (y == 4)).all())
        True
        >>> _ = layer.eval()
        >>> torch.equal(layer(torch.ones(3, 5)), torch.ones(3, 5))
        True
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, inverted: bool = True) -> None:
        super().__init__(p)
        self.inplace = check_bool("inplace", inplace)
        self.inverted = check_bool("inverted", inverted)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.forward_p, self.training, self.inverted, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}, inverted={self.inverted}"
