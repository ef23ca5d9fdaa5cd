"""Concrete dropout (Gal, Hron and Kendall, "Concrete Dropout", NeurIPS 2017): element
dropout whose probability ``p`` is learned by gradient descent.

A Bernoulli mask has no gradient with respect to ``p``; its continuous relaxation (the
Concrete, or relaxed Bernoulli, distribution) has one. With ``u ~ U(0, 1)`` and
temperature ``t``, the relaxed drop indicator is

    z = sigmoid((logit(p) + log u - log(1 - u)) / t)

which tends to a Bernoulli(p) draw as ``t -> 0`` and satisfies ``P(z > 1/2) = p`` for every
``t``. The output is ``x * (1 - z) / (1 - p)``, as in the paper; its mean is ``x`` only in
the limit: ``E[z]`` is not exactly ``p`` at ``t > 0`` (at ``t = 0.1``,
``E[(1 - z) / (1 - p)]`` is 0.9987 at ``p = 0.1``, 1 at ``p = 0.5`` and 1.0078 at
``p = 0.8``). It is computed in log space
(``exp(logsigmoid(-a / t) - logsigmoid(-logit p))``) so that it stays finite for any
finite logit. ``p`` is held as its logit, an ``nn.Parameter``.

Training needs the paper's regulariser beside the data loss, the KL divergence of the
approximate posterior from the prior per training example:

    l^2 / (tau N) * ||W||^2 / (1 - p)  +  2 K / (tau N) * (p log p + (1 - p) log (1 - p))

for the weights ``W`` that read the layer's output (``K`` of their input features), prior
length-scale ``l``, model precision ``tau`` and ``N`` training examples. The first term
pulls ``p`` down and the weights towards zero; the second (a negative entropy) pulls
``p`` towards 1/2; the data loss pulls ``p`` down unless the model overfits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dropout._validation import check_positive, check_positive_int, check_probability
from lightning_dropout.kernels.reference import draw_dtype
from lightning_dropout.layers.base import DropProbability
from lightning_dropout.layers.common import check_floating


def _open_probability(value: object) -> float:
    p = check_probability("p", value)
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"ConcreteDropout learns p through its logit, so p must be strictly between 0 and 1, "
            f"got {value!r}; for a fixed p use Dropout"
        )
    return p


def concrete_dropout(x: Tensor, p_logit: Tensor, temperature: float = 0.1, training: bool = True) -> Tensor:
    """Relaxed-Bernoulli dropout of ``x`` at ``p = sigmoid(p_logit)``, differentiable in ``p_logit``.

    The identity when not training. Each element is multiplied by ``(1 - z) / (1 - p)``
    with ``z`` the relaxed drop indicator of the module doc (the paper's scaling; the
    relaxation's ``E[z]`` is ``p`` only as the temperature tends to 0, see the module doc).

    Args:
        x: floating-point input of any shape.
        p_logit: 0-d tensor, the logit of the drop probability (finite).
        temperature: the relaxation's temperature, > 0 (smaller: closer to Bernoulli).
        training: drop (True) or return ``x`` (False).

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``temperature`` not a number.
        ValueError: ``temperature`` is not > 0.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> logit = torch.tensor(0.0, requires_grad=True)  # p = 0.5
        >>> y = concrete_dropout(torch.ones(100_000), logit)
        >>> round(y.mean().item(), 1), round(((y * 0.5) < 0.5).double().mean().item(), 2)
        (1.0, 0.5)
        >>> y.sum().backward(); logit.grad is not None
        True
    """
    check_floating(x)
    temperature = check_positive("temperature", temperature)
    if not training:
        return x
    dtype = draw_dtype(x)
    # Logistic noise log u - log(1 - u); u = 0 gives -inf, which only makes z = 0 (kept).
    noise = torch.rand(x.shape, dtype=dtype, device=x.device).logit_()
    logit = p_logit.to(dtype)
    # log((1 - z) / (1 - p)), in place where autograd allows: each pass is a full tensor.
    log_scale = F.logsigmoid((noise + logit).mul_(-1.0 / temperature)).sub_(F.logsigmoid(-logit))
    return (x * log_scale.exp_()).to(x.dtype)


class ConcreteDropout(DropProbability, nn.Module):
    """Element dropout with a learned drop probability (a relaxed Bernoulli mask).

    Gal, Hron and Kendall, "Concrete Dropout", NeurIPS 2017. ``p`` is stored as a logit
    parameter (``p_logit``) that the optimiser trains with the others; ``layer.p`` reads
    its current value, and assigning ``layer.p`` re-initialises it. Add
    :meth:`regularizer` to the loss (or let
    :class:`~lightning_dropout.callbacks.ConcreteDropoutRegularizer` add it): without it,
    the data loss alone drives ``p`` to 0. A learned p is not scheduled:
    :class:`~lightning_dropout.callbacks.DropoutScheduler` refuses it;
    :class:`~lightning_dropout.callbacks.DropRateMonitor` logs it.

    Args:
        p: the initial drop probability, strictly between 0 and 1.
        temperature: the relaxation's temperature, > 0 (the paper uses 0.1).

    Raises:
        TypeError: ``p`` or ``temperature`` is not a number.
        ValueError: ``p`` not in (0, 1), or ``temperature`` not > 0.

    Example:
        >>> layer = ConcreteDropout(p=0.2)
        >>> layer
        ConcreteDropout(p=0.2, temperature=0.1)
        >>> [name for name, _ in layer.named_parameters()]
        ['p_logit']
        >>> fc = torch.nn.Linear(8, 2)
        >>> loss = fc(layer(torch.randn(4, 8))).square().mean()
        >>> loss = loss + layer.regularizer(fc.weight, dataset_size=1000)
        >>> loss.backward(); layer.p_logit.grad is not None
        True
    """

    #: Its p is trained, not set: DropoutScheduler refuses to schedule it.
    learned_p: ClassVar[bool] = True

    def __init__(self, p: float = 0.1, temperature: float = 0.1) -> None:
        super().__init__()
        self.p_logit = nn.Parameter(torch.zeros(()))
        self.p = p
        self.temperature = check_positive("temperature", temperature)

    @property
    def p(self) -> float:
        """The current drop probability, ``sigmoid(p_logit)``."""
        return float(torch.sigmoid(self.p_logit.detach().double()))

    @p.setter
    def p(self, value: float) -> None:
        p = _open_probability(value)
        with torch.no_grad():
            self.p_logit.fill_(math.log(p) - math.log1p(-p))

    @property
    def p_tensor(self) -> Tensor:
        """``p`` as a 0-d float64 tensor on the layer's device (no gradient)."""
        return torch.sigmoid(self.p_logit.detach().double())

    def forward(self, x: Tensor) -> Tensor:
        return concrete_dropout(x, self.p_logit, self.temperature, self.training)

    def regularizer(
        self,
        weight: Tensor | Sequence[Tensor],
        dataset_size: int,
        length_scale: float = 1e-2,
        precision: float = 1.0,
        units: int | None = None,
    ) -> Tensor:
        """The paper's KL term for this layer, per training example, to add to the loss.

        ``l^2 / (tau N) * ||W||^2 / (1 - p) + 2 K / (tau N) * (p log p + (1 - p) log(1 - p))``
        (see the module doc): differentiable in ``p_logit`` and in ``weight``.

        Args:
            weight: the weights that read this layer's output (a ``Linear``'s ``weight``),
                one tensor or several.
            dataset_size: ``N``, the number of training examples.
            length_scale: ``l``, the prior length-scale, > 0.
            precision: ``tau``, the model precision (inverse observation noise), > 0.
            units: ``K``, the number of input features of ``weight``; by default its
                dim 1 (a Linear's ``in_features``, a convolution's input channels).

        Raises:
            TypeError: a wrongly typed argument.
            ValueError: an empty ``weight``, a non-positive number, or a weight of one
                dimension without ``units``.
        """
        weights = [weight] if isinstance(weight, Tensor) else list(weight)
        if not weights or not all(isinstance(w, Tensor) for w in weights):
            raise ValueError(f"weight must be a tensor or a non-empty sequence of tensors, got {weight!r}")
        n = check_positive_int("dataset_size", dataset_size)
        scale = check_positive("length_scale", length_scale) ** 2
        tau = check_positive("precision", precision)
        if units is None:
            if weights[0].dim() < 2:
                raise ValueError("units: a weight of one dimension has no input features; pass units")
            units = weights[0].shape[1]
        k = check_positive_int("units", units)
        logit = self.p_logit.float()
        squares = sum(w.float().square().sum() for w in weights)
        # 1 / (1 - p) = 1 + exp(logit); p log p + (1 - p) log(1 - p) from logsigmoid, finite
        # for any finite logit.
        weight_term = scale / (tau * n) * squares * (1.0 + torch.exp(logit))
        p, keep = torch.sigmoid(logit), torch.sigmoid(-logit)
        negative_entropy = p * F.logsigmoid(logit) + keep * F.logsigmoid(-logit)
        return weight_term + 2.0 * k / (tau * n) * negative_entropy

    def drop_counts(self, input: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(dropped, observed)`` elements of one forward, for the realised drop rate: an
        element counts as dropped when its relaxed drop indicator ``z`` exceeds 1/2 (which
        happens with probability ``p``), read from ``output / input`` where ``input != 0``."""
        nonzero = input != 0
        keep_weight = output / torch.where(nonzero, input, 1.0) * (1.0 - self.p_tensor)
        return (nonzero & (keep_weight < 0.5)).sum(), nonzero.sum()

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}, temperature={self.temperature}"
