"""The ``lightning-dropout`` console script."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    # Imported here so `lightning-dropout --help` stays fast.
    import lightning as L
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dropout import Dropout

    L.seed_everything(args.seed, verbose=False)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    train, test = order[:1400], order[1400:]

    class DigitsMLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), Dropout(0.5), nn.Linear(256, 10))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(self.net(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    model = DigitsMLP()
    trainer = L.Trainer(
        max_epochs=args.max_epochs, default_root_dir=args.out, logger=False, enable_checkpointing=False
    )
    trainer.fit(model, DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True))
    model.eval()
    with torch.no_grad():
        error = (model.net(x[test]).argmax(1) != y[test]).float().mean().item()
    print(f"test error of a 64-256-10 MLP with Dropout(0.5): {error:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the console script with ``argv`` (default: the process arguments).

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="lightning-dropout")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train on scikit-learn's digits and report")
    demo.add_argument("--max-epochs", type=int, default=20)
    demo.add_argument("--out", default="runs")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
