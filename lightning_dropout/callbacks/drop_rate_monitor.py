"""DropRateMonitor: each dropout site's realised drop rate beside its probability ``p``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._monitor import Removable, StepMonitor, watch_sites
from lightning_dropout.layers import DropCounter
from lightning_dropout.metrics import DropRate
from lightning_dropout.selection import check_patterns
from lightning_dropout.sites import DropoutSite, select_sites

# Their drops are not zeros of the output (alpha dropout sets a constant) or are not in
# the activations at all (DropConnect masks weights): only p is logged for them.
UNOBSERVABLE_KINDS = ("alpha", "dropconnect")


def realised_rate(kind: str, measured: float) -> float:
    """The drop rate a measurement shows: the drop fraction itself, or for Gaussian dropout
    the ``p`` whose noise variance ``p / (1 - p)`` equals the measured variance.

    Example:
        >>> realised_rate("gaussian", 1.0), realised_rate("dropout", 0.5)
        (0.5, 0.5)
    """
    return measured / (1.0 + measured) if kind == "gaussian" else measured


class DropRateMonitor(StepMonitor):
    """Log every dropout site's probability and the drop rate it actually realised.

    On each measured step (every ``every_n_steps`` optimizer steps), for every dropout
    site (see :mod:`lightning_dropout.sites`), logs ``dropout/<site>/p`` and, where the
    drops can be seen in the activations, ``dropout/<site>/realised``: the fraction of its
    nonzero inputs that came out as zeros (whole tokens for PatchDropout). Dropout modules
    are watched with hooks; dropout a module's code does with ``F.dropout`` (timm's heads,
    BART, transformers' eager attention) through a
    :class:`~lightning_dropout.sites.FunctionalProbe` open during the measured step only.
    Attention dropout inside ``scaled_dot_product_attention`` (BERT, Llama, timm's fused
    attention) is observed by evaluating those calls in math form on the measured steps,
    with the same ``p`` (the attention matrix is then materialised, as in eager attention).
    For :class:`~lightning_dropout.GaussianDropout` the realised rate is the ``p`` whose
    noise variance ``p / (1 - p)`` matches the measured one. A
    :class:`~lightning_dropout.layers.DropCounter` (a layer with a
    ``drop_counts(input, output)`` method) counts its own drops (ConcreteDropout: relaxed
    drops past 1/2; EmbeddingDropout: distinct tokens dropped). Alpha dropout and DropConnect
    hide their drops from the activations, and fused kernels (``nn.LSTM``'s between-layer
    dropout) hide their masks: only ``p`` is logged for those, and the sites that dropped
    unseen are named once in a warning. Rates are reduced over DDP ranks.

    Args:
        every_n_steps: measure every this many optimizer steps; None uses the trainer's
            ``log_every_n_steps``.
        sites: globs on qualified site names (a glob naming a module selects every site
            below it); None watches every site.

    Raises:
        TypeError: ``every_n_steps`` is not an int or None, ``sites`` not globs.
        ValueError: ``every_n_steps`` < 1; in ``setup``, a ``sites`` pattern matching no
            site (the error lists them).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[DropRateMonitor()], logger=False)
    """

    def __init__(self, every_n_steps: int | None = None, sites: str | Sequence[str] | None = None) -> None:
        super().__init__(every_n_steps)
        self.site_patterns = check_patterns("sites", sites)

    def _forget_run(self) -> None:
        super()._forget_run()
        self.sites: dict[str, DropoutSite] = {}
        self._rates: dict[str, DropRate] = {}
        self._p_used: dict[str, float] = {}  # the p of the measured forward, not a later one
        self._told_unseen = False

    def _select(self, pl_module: pl.LightningModule) -> Mapping[str, object]:
        self.sites = select_sites(pl_module, self.site_patterns)
        # Created for every site up front, so every rank computes the same metrics in the
        # same order (each compute() is a collective under DDP).
        self._rates = {
            name: DropRate() for name, site in self.sites.items() if site.kind not in UNOBSERVABLE_KINDS
        }
        self._told_unseen = False
        return self.sites

    def _charts(self) -> tuple[str, _dashboard.Charts]:
        charts = _dashboard.site_charts("dropout", self.sites, "p|realised")
        return _dashboard.RATE_CATEGORY, charts

    def _attach(self) -> list[Removable]:
        for metric in self._rates.values():
            # An empty update: a site this step does not reach computes NaN (not logged)
            # without torchmetrics warning that compute() came before update().
            metric.update(0, 0)
        return watch_sites(self.sites, self._observe)

    def _observe(self, site: DropoutSite, x: Tensor) -> Callable[[Tensor], None] | None:
        metric = self._rates.get(site.name)
        if metric is None:
            return None
        if site.p is not None:
            self._p_used[site.name] = site.p
        if metric.device != x.device:
            metric.to(x.device)
        # A layer whose drops are not zeros of a float input (ConcreteDropout's relaxed
        # mask, EmbeddingDropout's token indices) counts them itself.
        if site.is_module and isinstance(site.module, DropCounter):
            counter = site.module
            return lambda out: metric.update(*counter.drop_counts(x, out))
        if site.kind == "patch_dropout":
            prefix = int(getattr(site.module, "num_prefix_tokens", 0))
            tokens = (x.shape[1] - prefix) * x.shape[0]

            def count_tokens(out: Tensor) -> None:
                metric.update(tokens - (out.shape[1] - prefix) * out.shape[0], tokens)

            return count_tokens
        # Counted before the call: an inplace drop overwrites its input.
        zeros_in = x.eq(0).sum()
        nonzero = x.numel() - zeros_in
        if site.kind == "gaussian":

            def noise_variance(out: Tensor) -> None:
                ratio = torch.where(x != 0, out / torch.where(x != 0, x, 1), 1)
                metric.update((ratio - 1).square().sum(), nonzero)

            return noise_variance

        def count_zeros(out: Tensor) -> None:
            metric.update(out.eq(0).sum() - zeros_in, nonzero)

        return count_zeros

    def _report(self, trainer: pl.Trainer, step: int) -> None:
        scalars: dict[str, float] = {}
        for name, site in self.sites.items():
            p = self._p_used.get(name, site.p)
            if p is not None:
                scalars[f"dropout/{_dashboard.tag_prefix(name)}/p"] = p
        realised: set[str] = set()
        for name, metric in self._rates.items():
            value = float(metric.compute())  # a DDP reduction: every rank runs it
            metric.reset()
            if value == value:  # NaN when nothing was seen
                realised.add(name)
                tag = f"dropout/{_dashboard.tag_prefix(name)}/realised"
                scalars[tag] = realised_rate(self.sites[name].kind, value)
        unseen = [
            name
            for name, site in self.sites.items()
            if name not in realised and site.training and (site.p or 0.0) > 0.0
        ]
        if unseen and not self._told_unseen:
            self._told_unseen = True
            rank_zero_warn(
                "DropRateMonitor logs only p for these dropout sites: their drops are not zeros of "
                "the activations (alpha dropout, DropConnect), happen inside fused kernels "
                f"(nn.LSTM) or were not reached (LayerDrop, a skipped branch): {unseen}"
            )
        self._p_used.clear()
        _dashboard.log_scalars(trainer, scalars, step)
