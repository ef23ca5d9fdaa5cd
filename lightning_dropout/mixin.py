"""DropoutMixin: find, set and Monte-Carlo-sample the dropout sites of a LightningModule.

A thin layer over :mod:`lightning_dropout.sites` and :mod:`lightning_dropout.mc`; it works
on any ``nn.Module`` it is mixed into, a LightningModule being the intended one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from torch import nn

from lightning_dropout import mc
from lightning_dropout._deprecation import renamed_argument
from lightning_dropout.sites import DropoutSite, control, select_sites

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

Patterns = str | Sequence[str] | None
P = ParamSpec("P")
R = TypeVar("R")


def _model_method(
    function: Callable[Concatenate[nn.Module, P], R], doc: str
) -> Callable[Concatenate[Any, P], R]:
    """``function(model, ...)`` as a method of the module it is mixed into: one signature,
    kept by ``function``, so the method takes whatever arguments ``function`` takes."""

    def method(self: DropoutMixin, *args: P.args, **kwargs: P.kwargs) -> R:
        return function(self._module(), *args, **kwargs)

    method.__name__ = function.__name__
    method.__qualname__ = f"DropoutMixin.{function.__name__}"
    method.__doc__ = doc
    return method


class DropoutMixin:
    """Dropout controls for a module: mix in before ``pl.LightningModule``.

    Works on every dropout site of the module (see :mod:`lightning_dropout.sites`): dropout
    modules (this package's, torch's, timm's, torchvision's), attention dropout, rates a
    forward reads and ``nn.LSTM(dropout=)``, by qualified name.
    Fitted by a Trainer, it adds :class:`~lightning_dropout.callbacks.PerRankDropout`
    (see :meth:`configure_callbacks`), so DDP ranks draw their own dropout masks.

    Raises:
        TypeError: a method is called on an object that is not an ``nn.Module``.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Net(DropoutMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         nn = torch.nn
        ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2))
        ...         self.head = nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         return self.head(self.net(x))
        >>> model = Net().eval()
        >>> model.set_dropout_p(0.3, "net"); model.dropout_p()
        {'net.2': 0.3}
        >>> out = model.mc_predict(torch.randn(6, 4), n_samples=10)
        >>> out.mean.shape, out.mutual_information.shape, model.training
        (torch.Size([6, 3]), torch.Size([6]), False)
    """

    def dropout_sites(self, sites: Patterns = None) -> dict[str, DropoutSite]:
        """Every dropout site (every place the model drops) by qualified name.

        Sites are dropout modules, attention dropout handed to
        ``scaled_dot_product_attention``, rates a forward reads (``self.attention_dropout``,
        ``self.drop_rate``), ``nn.LSTM(dropout=)`` and functional dropout with a rate
        written in the code; see :mod:`lightning_dropout.sites`.

        Args:
            sites: a glob (or list of globs) on qualified site names; a glob naming a
                module selects every site below it; None for all.

        Raises:
            TypeError: ``sites`` is not a string, a list of strings or None.
            ValueError: ``sites`` matches no site (the message lists them all).
        """
        return select_sites(self._module(), sites)

    def dropout_layers(self, sites: Patterns = None, *, pattern: Patterns = None) -> dict[str, nn.Module]:
        """Every dropout module by qualified name (the sites that are modules).

        Args:
            sites: a glob (or list of globs) such as ``"encoder"`` or ``"encoder.*"``; a
                glob naming a module selects every dropout module below it; None for all.
            pattern: the deprecated name of ``sites``.

        Raises:
            TypeError: ``sites`` is not a string, a list of strings or None, or both
                ``sites`` and ``pattern`` are given.
            ValueError: ``sites`` matches no dropout module (the message lists them all).
        """
        sites = renamed_argument("DropoutMixin.dropout_layers", "pattern", "sites", pattern, sites)
        return control.dropout_layers(self._module(), sites)

    def set_dropout_p(self, p: float, sites: Patterns = None, *, pattern: Patterns = None) -> None:
        """Set the drop probability of every dropout site matching ``sites``.

        Sites whose rate is written in code keep it and are named in a warning.

        Args:
            p: the new drop probability in [0, 1] (validated before anything changes).
            sites: a glob (or list of globs) on qualified site names; None for all.
            pattern: the deprecated name of ``sites``.

        Raises:
            TypeError: ``p`` is not a number, ``sites`` not a string, a list of strings or
                None, or both ``sites`` and ``pattern`` are given.
            ValueError: ``p`` outside [0, 1], a glob that matches nothing, or no
                dropout site whose p can be set.
        """
        sites = renamed_argument("DropoutMixin.set_dropout_p", "pattern", "sites", pattern, sites)
        control.set_dropout_p(self._module(), p, sites)

    def dropout_p(self) -> dict[str, float]:
        """The drop probability of every dropout site whose rate is known, by qualified name."""
        return {name: site.p for name, site in self.dropout_sites().items() if site.p is not None}

    mc_dropout = _model_method(
        mc.mc_dropout,
        """A context manager under which every dropout site (or those matching ``sites``) drops.

        Attention dropout and rates read in a forward included; BatchNorm and every other
        module keep their mode; all modes are restored on exit, also after an exception.
        Takes :func:`lightning_dropout.mc.mc_dropout`'s arguments after the model.
        """,
    )

    mc_predict = _model_method(
        mc.mc_predict,
        """Monte-Carlo dropout prediction over ``n_samples`` stochastic passes of ``self(x)``.

        Takes :func:`lightning_dropout.mc.mc_predict`'s arguments after the model
        (``x, n_samples=30, batched=True, ...``, ``consistent`` masks, a ``seed``,
        ``sites`` globs, ``output="gaussian"``). Under ``torch.no_grad``; BatchNorm
        statistics untouched.

        Raises:
            TypeError: a wrongly typed argument or a non-tensor output.
            ValueError: a bad ``n_samples``, ``chunk_size``, ``output`` or class dimension,
                a model that cannot be replicated along dim 0 with ``batched=True``, or a
                glob in ``sites`` that matches no site.
        """,
    )

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """Lightning hook: add :class:`~lightning_dropout.callbacks.PerRankDropout` by default.

        Data-parallel ranks then draw their own reproducible dropout masks (DDP, FSDP, and
        the data-parallel dimension of ``ModelParallelStrategy``, whose tensor-parallel
        groups share masks). The default accepts the strategies ``PerRankDropout`` accepts;
        under DeepSpeed its setup raises an error naming the strategy and the option to pass.
        Nothing is added when the trainer already has a ``PerRankDropout``: pass
        ``PerRankDropout(enabled=False)`` to the Trainer to restore torch's shared masks, or
        ``PerRankDropout(sharded_modules=[...])`` to name sites whose activations are sharded
        across a tensor-parallel group. A module overriding this hook keeps the default by
        extending ``super().configure_callbacks()``.
        """
        # Imported here so that `import lightning_dropout` (and its pure-torch parts) does
        # not import Lightning.
        from lightning.pytorch.callbacks import Callback

        from lightning_dropout.callbacks.per_rank_dropout import PerRankDropout

        parent = getattr(super(), "configure_callbacks", None)
        inherited = parent() if parent is not None else []
        callbacks = [inherited] if isinstance(inherited, Callback) else list(inherited)
        trainer = self.trainer  # type: ignore[attr-defined]
        present = [*trainer.callbacks, *callbacks]
        if not any(isinstance(callback, PerRankDropout) for callback in present):
            callbacks.append(PerRankDropout())
        return callbacks

    def _module(self) -> nn.Module:
        if not isinstance(self, nn.Module):
            raise TypeError(f"DropoutMixin must be mixed into an nn.Module, not {type(self).__name__}")
        return self
