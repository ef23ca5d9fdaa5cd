"""What the demo measures on a trained classifier: error, NLL and the units, Figure 8's way."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dropout.demo.data import DigitsDataModule
from lightning_dropout.demo.models import DigitsClassifier
from lightning_dropout.layers import is_dropout_layer
from lightning_dropout.metrics import CoActivation


@dataclass
class LayerStats:
    """One hidden layer of a trained model, measured on the test set in evaluation mode.

    ``p`` and ``realised`` describe the dropout layer after it, if any: its probability and
    the fraction of its nonzero inputs it zeroed in one training-mode pass.
    """

    name: str
    mean_abs_corr: float
    sparsity: float
    mean_activation: float
    p: float | None = None
    realised: float | None = None


@dataclass
class RunResult:
    """One trained classifier: errors and mean NLLs on its training and test splits, its layers."""

    model: str
    seed: int
    test_error: float
    test_nll: float
    train_error: float
    train_nll: float
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def nll_gap(self) -> float:
        """Test NLL minus training NLL: how much of the fit does not generalise."""
        return self.test_nll - self.train_nll


@contextmanager
def captured_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Record each module's latest output under its name while the block runs.

    Example:
        >>> relu = nn.ReLU()
        >>> with captured_outputs({"relu": relu}) as outputs:
        ...     _ = relu(torch.tensor([-1.0, 2.0]))
        >>> outputs["relu"]
        tensor([0., 2.])
    """
    store: dict[str, Tensor] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            store[name] = output.detach()

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def unit_stats(acts: Tensor) -> dict[str, Tensor]:
    """:class:`~lightning_dropout.metrics.CoActivation` of one batch of activations
    (``[B, D]`` units or ``[B, C, ...]`` channels)."""
    metric = CoActivation(acts.shape[1]).to(acts.device)
    metric.update(acts)
    return metric.compute()


@torch.no_grad()
def measure_classifier(name: str, seed: int, model: DigitsClassifier, data: DigitsDataModule) -> RunResult:
    """Error and NLL on the training and test splits, and each hidden layer's co-adaptation,
    sparsity and mean activation on the test split, all in evaluation mode (the network as
    used at test time); the realised drop rates in training mode, over the test split."""
    model.eval()
    scores = {}
    for split in ("train", "test"):
        inputs, targets = (t.to(model.device) for t in data.splits[split].tensors)
        with captured_outputs(model.hidden_units()) as hidden:
            logits = model(inputs)
        scores[split] = (
            float((logits.argmax(1) != targets).float().mean()),
            float(F.cross_entropy(logits, targets)),
        )
    result = RunResult(name, seed, *scores["test"], *scores["train"])
    dropout_after = _dropout_after_units(model)
    realised = _realised_rates(model, inputs)
    for unit_name, acts in hidden.items():
        stats = unit_stats(acts)
        layer = LayerStats(
            unit_name,
            float(stats["mean_abs_corr"]),
            float(stats["sparsity"]),
            float(stats["mean_activation"].mean()),
        )
        drop_name = dropout_after.get(unit_name)
        if drop_name is not None:
            layer.p = float(getattr(model.net, drop_name).p)
            layer.realised = realised[drop_name]
        result.layers.append(layer)
    return result


def _dropout_after_units(model: DigitsClassifier) -> dict[str, str]:
    names = [name for name, _ in model.net.named_children()]
    units = model.hidden_units()
    return {
        unit: following
        for unit, following in itertools.pairwise(names)
        if unit in units and is_dropout_layer(getattr(model.net, following))
    }


def _realised_rates(model: DigitsClassifier, inputs: Tensor) -> dict[str, float]:
    counts: dict[str, tuple[int, int]] = {}

    def counting(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            nonzero_in = args[0] != 0
            counts[name] = (int((nonzero_in & (output == 0)).sum()), int(nonzero_in.sum()))

        return hook

    layers = {n: m for n, m in model.net.named_children() if is_dropout_layer(m)}
    handles = [m.register_forward_hook(counting(n)) for n, m in layers.items()]
    try:
        model.train()
        model(inputs)
    finally:
        model.eval()
        for handle in handles:
            handle.remove()
    return {n: (dropped / total if total else math.nan) for n, (dropped, total) in counts.items()}
