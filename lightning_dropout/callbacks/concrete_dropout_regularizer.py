"""ConcreteDropoutRegularizer: the KL term of every ConcreteDropout, added without touching
``training_step``.

Why a callback that adds gradients, and not a term added to the loss by a hook: the only
hook that sees the loss before backward (``on_before_backward``) receives it already
scaled under mixed precision and cannot replace it. Before each optimizer step instead
(``on_before_optimizer_step``), Lightning has unscaled the gradients and not yet clipped
them; backpropagating the regulariser there adds exactly the gradient it would have
contributed as part of the loss: once per optimizer step (so gradient accumulation's
averaging leaves it whole), in full precision, and before clipping.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dropout._validation import check_positive, check_positive_int
from lightning_dropout.callbacks._run import DropoutCallback
from lightning_dropout.layers import ConcreteDropout


def _check_weights(value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not value:
        raise TypeError(f"weights must be a non-empty dict of layer name to weight name(s), got {value!r}")
    checked: dict[str, list[str]] = {}
    for layer, names in value.items():
        listed = [names] if isinstance(names, str) else names
        if not isinstance(layer, str) or not isinstance(listed, list) or not listed:
            raise TypeError(f"weights[{layer!r}] must name a module or parameter (or a list), got {names!r}")
        if not all(isinstance(n, str) for n in listed):
            raise TypeError(f"weights[{layer!r}] must name a module or parameter (or a list), got {names!r}")
        checked[layer] = list(listed)
    return checked


def _resolve(model: nn.Module, layer: str, name: str) -> Tensor:
    """The parameter called ``name``, or the ``weight`` of the module called ``name``."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        pass
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"weights[{layer!r}]: {name!r} is neither a module nor a parameter of the model"
        ) from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"weights[{layer!r}]: module {name!r} ({type(module).__name__}) has no weight; "
            f"name its parameters: {[n for n, _ in module.named_parameters()]}"
        )
    return weight


class ConcreteDropoutRegularizer(DropoutCallback):
    """Add every :class:`~lightning_dropout.ConcreteDropout`'s KL regulariser to the gradients.

    Before each optimizer step, backpropagates
    ``sum(layer.regularizer(weights, dataset_size, length_scale, precision))`` over the
    model's ConcreteDropout layers (see :meth:`ConcreteDropout.regularizer
    <lightning_dropout.layers.concrete.ConcreteDropout.regularizer>`), which gives the same
    gradients as adding that sum to the loss (see the module doc for why it is done here).
    Each layer is paired with the weights that read its output, named in ``weights``.

    Args:
        dataset_size: ``N``, the number of training examples.
        weights: each ConcreteDropout's qualified name (as in ``model.named_modules()``)
            mapped to the module whose ``weight`` reads its output (``"fc2"``), a parameter
            name (``"lstm.weight_ih_l0"``), or a list of them.
        length_scale: the prior length-scale ``l``, > 0.
        precision: the model precision ``tau``, > 0.

    Raises:
        TypeError: wrongly typed arguments.
        ValueError: a non-positive number. At fit start: a model without ConcreteDropout, a
            ConcreteDropout missing from ``weights`` or an entry naming none, or a weight
            name that names nothing.

    Example:
        >>> import lightning.pytorch as pl
        >>> reg = ConcreteDropoutRegularizer(dataset_size=60_000, weights={"drop1": "fc2"})
        >>> trainer = pl.Trainer(callbacks=[reg], logger=False)
    """

    def __init__(
        self,
        dataset_size: int,
        weights: dict[str, str | list[str]],
        length_scale: float = 1e-2,
        precision: float = 1.0,
    ) -> None:
        self.dataset_size = check_positive_int("dataset_size", dataset_size)
        self.weights = _check_weights(weights)
        self.length_scale = check_positive("length_scale", length_scale)
        self.precision = check_positive("precision", precision)
        self._forget_run()

    def _forget_run(self) -> None:
        super()._forget_run()
        self._pairs: list[tuple[ConcreteDropout, list[Tensor]]] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here rather than in setup: layers built in configure_model exist only from now on.
        layers = {n: m for n, m in pl_module.named_modules() if isinstance(m, ConcreteDropout)}
        if not layers:
            raise ValueError(
                f"ConcreteDropoutRegularizer found no ConcreteDropout in {type(pl_module).__name__}"
            )
        unknown = sorted(set(self.weights) - set(layers))
        missing = sorted(set(layers) - set(self.weights))
        if unknown or missing:
            raise ValueError(
                f"weights must name every ConcreteDropout of the model and nothing else: "
                f"unknown {unknown}, missing {missing}; the model's are {sorted(layers)}"
            )
        self._pairs = [
            (layers[layer], [_resolve(pl_module, layer, name) for name in names])
            for layer, names in self.weights.items()
        ]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        with torch.enable_grad():
            total = sum(
                layer.regularizer(weights, self.dataset_size, self.length_scale, self.precision)
                for layer, weights in self._pairs
            )
            assert isinstance(total, Tensor)
            total.backward()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pairs = []

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dataset_size={self.dataset_size}, weights={self.weights}, "
            f"length_scale={self.length_scale}, precision={self.precision})"
        )
