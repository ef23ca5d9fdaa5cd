"""ConcreteDropoutRegularizer: the gradients of loss + regulariser, once per optimizer step."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_dropout import ConcreteDropout
from lightning_dropout.callbacks import ConcreteDropoutRegularizer

N = 500


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.drop = ConcreteDropout(0.3)
        self.fc2 = nn.Linear(8, 1)
        self.rng_states: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.rng_states.append(torch.get_rng_state())
        x, y = batch
        return (self(x) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GradientsBeforeStep(pl.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)) for _ in range(2)
    ]


def test_gradients_are_those_of_the_loss_plus_the_regularizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    initial = copy.deepcopy(model)
    regularizer = ConcreteDropoutRegularizer(N, {"drop": "fc2"}, length_scale=0.5)
    captured = GradientsBeforeStep()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        accumulate_grad_batches=2,
        callbacks=[regularizer, captured],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(batches(), batch_size=None))
    (got,) = captured.grads
    # The same two forwards by hand: the mean of the accumulated losses, plus the term once.
    loss = torch.zeros(())
    for state, (x, y) in zip(model.rng_states, batches(), strict=True):
        torch.set_rng_state(state)
        loss = loss + (initial(x) - y).square().mean() / 2
    loss = loss + initial.drop.regularizer(initial.fc2.weight, N, length_scale=0.5)
    loss.backward()
    expected = {n: p.grad for n, p in initial.named_parameters()}
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=name)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"other": "fc2"}, r"unknown \['other'\], missing \['drop'\]"),
        ({"drop": "fc3"}, "neither a module nor a parameter"),
        ({"drop": "drop"}, "has no weight"),
    ],
)
def test_pairs_are_checked_at_fit_start(tmp_path: Path, weights: dict[str, str], match: str) -> None:
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False)
    trainer.callbacks.append(ConcreteDropoutRegularizer(N, weights))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        trainer.fit(Net(), torch.utils.data.DataLoader(batches(), batch_size=None))


def test_arguments_are_validated() -> None:
    with pytest.raises(TypeError, match="weights"):
        ConcreteDropoutRegularizer(N, {})
    with pytest.raises(TypeError, match="weights"):
        ConcreteDropoutRegularizer(N, {"drop": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="dataset_size"):
        ConcreteDropoutRegularizer(0, {"drop": "fc2"})
    regularizer = ConcreteDropoutRegularizer(N, {"drop": ["fc2", "fc1.weight"]})
    assert regularizer.weights == {"drop": ["fc2", "fc1.weight"]}
    assert "dataset_size=500" in repr(regularizer)
