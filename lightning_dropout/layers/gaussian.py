"""Gaussian dropout (Srivastava et al., JMLR 2014, section 10): multiply each unit by
noise drawn from N(1, p / (1 - p)) instead of a scaled Bernoulli variable. The noise has
the same mean and variance as inverted Bernoulli dropout's ``mask / (1 - p)``.
"""

from __future__ import annotations

from torch import Tensor

from lightning_dropout import kernels
from lightning_dropout.layers.base import DropoutBase
from lightning_dropout.layers.common import check_floating, check_p, exact_output


def gaussian_dropout(x: Tensor, p: float | Tensor = 0.5, training: bool = True) -> Tensor:
    """Multiply ``x`` by independent N(1, p / (1 - p)) noise in training.

    The identity when not training or when ``p = 0``. ``p = 1`` (infinite variance) is
    taken as "drop everything" and gives exact zeros.

    Args:
        x: floating-point input of any shape.
        p: the drop probability of the Bernoulli dropout this one matches, in [0, 1]: a
            float or a 0-d tensor (see :mod:`lightning_dropout.layers.common`).
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
    p = check_p(p)
    if not training:
        return x
    if (exact := exact_output(x, p)) is not None:
        return exact
    return kernels.gaussian_noise(x, p)


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
        return gaussian_dropout(x, self.forward_p, self.training)
