"""One dropout site: a place where a model drops, with its name, kind and rate."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_dropout._validation import check_probability
from lightning_dropout.layers import DropProbability

#: What a site drops. ``dropout``: elements; ``channel``: whole channels (SpatialDropout);
#: ``alpha``: alpha dropout (drops to a constant, not zero); ``gaussian``: multiplicative
#: noise; ``dropconnect``: weights; ``attention``: attention probabilities (often inside
#: ``scaled_dot_product_attention``); ``drop_path``: whole residual branches per sample
#: (stochastic depth); ``drop_block``: contiguous blocks of feature maps; ``patch_dropout``:
#: whole tokens; ``layer_drop``: whole layers per step (LayerDrop); ``rnn``: between the
#: layers of a stacked RNN (``nn.LSTM(dropout=)``).
SITE_KINDS = (
    "dropout",
    "channel",
    "alpha",
    "gaussian",
    "dropconnect",
    "attention",
    "drop_path",
    "drop_block",
    "patch_dropout",
    "layer_drop",
    "rnn",
)


def is_rate(value: Any) -> bool:
    """Whether ``value`` can be a drop probability: a real number (not a bool) in [0, 1].

    Example:
        >>> is_rate(0.1), is_rate(True), is_rate(2.0)
        (True, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    number = float(value)
    return not math.isnan(number) and 0.0 <= number <= 1.0


@dataclass(frozen=True, eq=False)
class DropoutSite:
    """A place where a model drops.

    Attributes:
        name: the qualified name. A dropout module's own name
            (``"encoder.layer.0.output.dropout"``); for a rate that a module's code reads,
            the module's name and the attribute path (``"layers.0.self_attn.attention_dropout"``,
            ``"lstm.dropout"``); for a rate written as a number in a module's code, the
            module's name and ``"<function>@<line>"`` (``"head.dropout@42"``).
        kind: one of :data:`SITE_KINDS`.
        module: the module the site belongs to: the dropout module itself, or the module
            whose code drops.
        gates: the modules whose ``training`` flag must be on for the site to drop (the
            module itself; for a rate passed as ``p if self.training else 0`` also the
            module whose code does that). Monte-Carlo inference turns on exactly these.
        holder: the object holding the rate (a module, or whatever object the code reads
            the rate from), None when the rate is written in the code.
        attribute: the holder's attribute with the rate, None when the rate cannot be set.
        written_p: the rate written in the code, when it is a number there.
        is_module: whether the site is a dropout module (rather than a rate that a
            module's code uses).

    Example:
        >>> drop = torch.nn.Dropout(0.2)
        >>> site = DropoutSite("drop", "dropout", drop, (drop,), drop, "p", is_module=True)
        >>> site.p, site.settable
        (0.2, True)
        >>> site.set_p(0.4); drop.p
        0.4
    """

    name: str
    kind: str
    module: nn.Module
    gates: tuple[nn.Module, ...]
    holder: Any = None
    attribute: str | None = None
    written_p: float | None = None
    is_module: bool = False

    @property
    def settable(self) -> bool:
        """Whether the rate lives in an attribute that can be set."""
        return self.holder is not None and self.attribute is not None

    @property
    def learned(self) -> bool:
        """Whether the rate is a trained parameter (ConcreteDropout): not to be set from outside."""
        return isinstance(self.holder, DropProbability) and self.holder.learned_p

    @property
    def p(self) -> float | None:
        """The current drop probability; None when the code computes it at run time."""
        if self.settable:
            return float(getattr(self.holder, str(self.attribute)))
        return self.written_p

    def set_p(self, p: float) -> None:
        """Set the drop probability.

        Raises:
            TypeError: ``p`` is not a number.
            ValueError: ``p`` outside [0, 1], or a rate that lives in code, not in an
                attribute.
        """
        p = check_probability("p", p)
        if not self.settable:
            raise ValueError(
                f"site {self.name!r} has its rate written in the code of "
                f"{type(self.module).__name__}, not in an attribute: it cannot be set"
            )
        setattr(self.holder, str(self.attribute), p)

    @property
    def training(self) -> bool:
        """Whether every gate is in training mode, i.e. the site drops in a forward now."""
        return all(gate.training for gate in self.gates)

    def __repr__(self) -> str:
        p = "?" if self.p is None else f"{self.p:g}"
        return f"DropoutSite({self.name!r}, kind={self.kind!r}, p={p})"
