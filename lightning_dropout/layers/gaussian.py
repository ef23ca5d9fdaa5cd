"""Gaussian dropout (Srivastava et al., JMLR 2014, section 10): multiply each unit by
noise drawn from N(1, p / (1 - p)) instead of a scaled Bernoulli variable. The noise has
the same mean and variance as inverted Bernoulli dropout's ``mask / (1 - p)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dropout import kernels
from lightning_dropout._validation import check_probability
from lightning_dropout.layers.base import DropoutBase, check_floating
from lightning_dropout.layers.dropout import zeros_like_connected
from lightning_dropout.layers.traceable import traceable_gaussian_dropout


def gaussian_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Multiply ``x`` by independent N(1, p / (1 - p)) noise in training.

    The identity when not training or when ``p = 0``. ``p = 1`` (infinite variance) is
    taken as "drop everything" and gives exact zeros.

    Args:
        x: floating-point input of any shape.
        p: the drop probability of the Bernoulli dropout this one matches, in [0, 1].
        training: add noise (True) or return ``x`` (False).

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``p`` is not a number.
        ValueError: ``p`` is NaN or outside [0, 1].

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = gaussian_dropout(torch.ones(100_000), p=0.5)
        >>> round(y.mean().item(), 1), round(y.var().item(), 1)
        (1.0, 1.0)
    """
    check_floating(x)
    p = check_probability("p", p)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return zeros_like_connected(x)
    return kernels.gaussian_dropout(x, math.sqrt(p / (1.0 - p)))


class GaussianDropout(DropoutBase):
    """Multiplicative Gaussian noise N(1, p / (1 - p)) in training; identity in eval.

    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
    Overfitting", JMLR 2014, section 10.

    Args:
        p: drop probability of the matching Bernoulli dropout, in [0, 1]; may be
            reassigned between steps.

    Raises:
        TypeError: ``p`` is not a number.
        ValueError: ``p`` is NaN or outside [0, 1].

    Example:
        >>> layer = GaussianDropout(p=0.2).eval()
        >>> torch.equal(layer(torch.ones(3)), torch.ones(3))
        True
    """

    site_kind = "gaussian"

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            check_floating(x)
            return traceable_gaussian_dropout(x, self.p_tensor, self.training)
        return gaussian_dropout(x, self.p, self.training)
