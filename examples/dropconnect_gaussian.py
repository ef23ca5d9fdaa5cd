"""DropConnect with the paper's Gaussian inference (Wan et al., ICML 2013).

A hidden DropConnectLinear layer (weights dropped with p = 0.5, one mask per sample)
is trained on the digits. At test time the layer can use its plain weights
(``inference="mean"``) or the moment-matched Gaussian: the pre-activation u of a training
pass has mean W v + b and variance p/(1-p) (W*W)(v*v); evaluation averages relu(u) over
``n_samples`` draws. Both are compared, and with Monte-Carlo averaging of real masks.

    python examples/dropconnect_gaussian.py            # full run
    python examples/dropconnect_gaussian.py --fast     # a few seconds
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from _fast import parse
from torch import nn

from lightning_dropout import DropConnectLinear
from lightning_dropout.demo import DigitsClassifier, DigitsDataModule


class DropConnectNet(DigitsClassifier):
    """64 - DropConnect(hidden, relu) - 10."""

    def __init__(self, hidden: int = 256, p: float = 0.5, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.hidden = DropConnectLinear(
            64, hidden, p=p, per_sample=True, inference="gaussian", activation="relu", n_samples=200
        )
        self.net = nn.Sequential(self.hidden, nn.Linear(hidden, 10))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse(__doc__, argv, epochs=30)
    pl.seed_everything(args.seed, verbose=False)
    model = DropConnectNet(hidden=64 if args.fast else 256)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        enable_model_summary=False,
    )
    data = DigitsDataModule(seed=args.seed, flatten=True)
    trainer.fit(model, datamodule=data)
    inputs, targets = data.splits["test"].tensors
    accuracy = {}
    model.eval()
    with torch.no_grad():
        for mode in ("mean", "gaussian"):
            model.hidden.inference = mode
            accuracy[mode] = float((model(inputs).argmax(1) == targets).float().mean())
        mc = model.mc_predict(inputs, n_samples=50 if not args.fast else 5)
        accuracy["mc masks"] = float((mc.mean.argmax(1) == targets).float().mean())
    for mode, value in accuracy.items():
        print(f"test accuracy, inference={mode!r}: {value:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
