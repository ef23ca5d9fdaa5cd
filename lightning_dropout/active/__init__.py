"""Active learning with MC dropout: acquisition functions (pure PyTorch) and a Lightning loop.

See ``docs/active.md``. :mod:`lightning_dropout.active.acquisition` never imports Lightning;
:class:`ActiveDataModule` and :class:`ActiveLearningLoop` do.
"""

from lightning_dropout.active.acquisition import (
    bald,
    batch_bald,
    margin,
    max_entropy,
    power_bald,
    random,
    select,
    variation_ratio,
)
from lightning_dropout.active.data import ActiveDataModule
from lightning_dropout.active.loop import ACQUISITIONS, ActiveLearningLoop

__all__ = [
    "ACQUISITIONS",
    "ActiveDataModule",
    "ActiveLearningLoop",
    "bald",
    "batch_bald",
    "margin",
    "max_entropy",
    "power_bald",
    "random",
    "select",
    "variation_ratio",
]
