"""Monte-Carlo dropout uncertainty on handwritten digits: in- versus out-of-distribution.

Trains a small MLP with BatchNorm, Dropout and DropConnect on sklearn's 8x8 digits, then
predicts with the MCDropout callback (dropout stays stochastic while BatchNorm stays in
eval mode) on held-out digits and on three out-of-distribution sets: uniform noise,
inverted digits (1 - x) and digits rotated by 90 degrees. The predictive entropy and the
mutual information (BALD) are higher out of distribution. Rotated digits are the
hard, near-distribution case: the network maps them confidently onto other digits, so
their entropy barely rises while their BALD score does. The last column is the entropy of
one deterministic (eval-mode) pass, for comparison.

    python examples/mc_uncertainty.py             # full run
    python examples/mc_uncertainty.py --fast      # a few seconds (also LIGHTNING_DROPOUT_FAST=1)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import DropConnectLinear, Dropout, DropoutMixin, MCOutput
from lightning_dropout.callbacks import MCDropout


class DigitsMLP(DropoutMixin, L.LightningModule):
    def __init__(self, hidden: int = 128, p: float = 0.3, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            Dropout(p),
            DropConnectLinear(hidden, hidden, p=p, activation="relu"),
            Dropout(p),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def datasets(seed: int) -> dict[str, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1400], order[1400:]
    x_test, y_test = x[test], y[test]
    images = x_test.reshape(-1, 8, 8)
    noise = torch.rand(x_test.shape, generator=torch.Generator().manual_seed(seed + 1))
    return {
        "train": TensorDataset(x[train], y[train]),
        "in-distribution (held-out digits)": TensorDataset(x_test, y_test),
        "OOD: uniform noise": TensorDataset(noise, y_test),
        "OOD: inverted digits": TensorDataset(1.0 - x_test, y_test),
        "OOD: digits rotated 90 deg": TensorDataset(images.rot90(1, (1, 2)).reshape(-1, 64), y_test),
    }


def merge(outputs: Sequence[MCOutput]) -> dict[str, Tensor]:
    return {
        "probs": torch.cat([o.mean for o in outputs]),
        "entropy": torch.cat([o.entropy for o in outputs if o.entropy is not None]),
        "mutual_information": torch.cat(
            [o.mutual_information for o in outputs if o.mutual_information is not None]
        ),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="few epochs and samples (for tests)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lightning_logs/mc_uncertainty")
    args = parser.parse_args(argv)
    fast = args.fast or os.environ.get("LIGHTNING_DROPOUT_FAST") == "1"
    epochs = args.epochs or (3 if fast else 30)
    n_samples = args.n_samples or (10 if fast else 100)

    L.seed_everything(args.seed, verbose=False)
    data = datasets(args.seed)
    model = DigitsMLP()
    common: dict[str, Any] = {
        "default_root_dir": args.out,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    L.Trainer(max_epochs=epochs, **common).fit(model, DataLoader(data["train"], batch_size=64, shuffle=True))
    predictor = L.Trainer(callbacks=[MCDropout(n_samples=n_samples)], **common)
    plain = L.Trainer(**common)

    results: dict[str, dict[str, float]] = {}
    print(f"MC dropout, {n_samples} stochastic passes per input; mean over each set (nats):")
    print(
        f"{'set':36s} {'entropy':>8s} {'BALD':>8s} {'max prob':>9s} {'accuracy':>9s} {'no-MC entropy':>14s}"
    )
    for name, dataset in list(data.items())[1:]:
        outputs = predictor.predict(model, DataLoader(dataset, batch_size=256))
        assert outputs is not None
        merged = merge(outputs)  # type: ignore[arg-type]
        logits = torch.cat(plain.predict(model, DataLoader(dataset, batch_size=256)))  # type: ignore[arg-type]
        deterministic = torch.special.entr(logits.softmax(-1)).sum(-1)
        row = {
            "entropy": merged["entropy"].mean().item(),
            "mutual_information": merged["mutual_information"].mean().item(),
            "max_prob": merged["probs"].max(-1).values.mean().item(),
            "accuracy": (merged["probs"].argmax(-1) == dataset.tensors[1]).float().mean().item(),
            "deterministic_entropy": deterministic.mean().item(),
        }
        results[name] = row
        print(
            f"{name:36s} {row['entropy']:8.3f} {row['mutual_information']:8.3f} "
            f"{row['max_prob']:9.3f} {row['accuracy']:9.3f} {row['deterministic_entropy']:14.3f}"
        )
    in_dist = next(iter(results.values()))["entropy"]
    ood = [r["entropy"] for n, r in results.items() if n.startswith("OOD")]
    print(f"OOD entropy / in-distribution entropy: {min(ood) / in_dist:.1f}x to {max(ood) / in_dist:.1f}x")
    return results


if __name__ == "__main__":
    main()
