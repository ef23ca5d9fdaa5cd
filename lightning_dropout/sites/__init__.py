"""Dropout sites: every place a model drops, found once and used by every part.

Real models drop in more forms than ``nn.Dropout`` modules: attention dropout passed to
``scaled_dot_product_attention``, float rates a forward reads (``self.attention_dropout``
in transformers, ``F.dropout(x, p=self.drop_rate)`` in timm), ``nn.LSTM(dropout=)``,
drop-path modules. A *site* is any such place, with a qualified name, a kind and a rate
(:class:`DropoutSite`); :func:`find_sites` finds them (see
:mod:`lightning_dropout.sites.discovery` for the rules); the scheduler, the mixin,
Monte-Carlo inference and the monitors all work on them. Pure PyTorch.
"""

from lightning_dropout.sites.control import dropout_layers, select_sites, set_dropout_p, sites_training
from lightning_dropout.sites.discovery import (
    FOREIGN_MODULES,
    find_sites,
    module_rate,
    register_dropout_module,
)
from lightning_dropout.sites.probe import FunctionalProbe, function_sites
from lightning_dropout.sites.site import SITE_KINDS, DropoutSite, is_rate

__all__ = [
    "FOREIGN_MODULES",
    "SITE_KINDS",
    "DropoutSite",
    "FunctionalProbe",
    "dropout_layers",
    "find_sites",
    "function_sites",
    "is_rate",
    "module_rate",
    "register_dropout_module",
    "select_sites",
    "set_dropout_p",
    "sites_training",
]
