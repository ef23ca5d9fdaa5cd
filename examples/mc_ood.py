"""How good is MC dropout's uncertainty? Calibration against the deterministic network, and
out-of-distribution detection, on handwritten digits.

Trains a small MLP with dropout on sklearn's 8x8 digits (held-out digits measured by
MCDropout with MC and deterministic predictions at every validation epoch), then tests it
with MCDropout against three shifted sets: uniform noise, inverted digits (1 - x) and digits
rotated by 90 degrees, each as the out-of-distribution test dataloader. Prints two tables:
accuracy, NLL, Brier score and ECE of the MC mean against one eval-mode pass on the held-out
digits, then per shifted set the AUROC of the MC entropy, of BALD and of the deterministic
entropy, and the FPR at 95% TPR of the MC entropy. Everything is logged to TensorBoard
under ``<out>/mc_ood`` (a run ``fit`` with the validation epochs, one run per shifted set):
the reliability diagrams, the histograms of entropy and BALD, and the MC against
deterministic charts.

    python examples/mc_ood.py            # full run
    python examples/mc_ood.py --fast     # a few seconds (also LIGHTNING_DROPOUT_FAST=1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from _fast import parse
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from lightning_dropout import Dropout
from lightning_dropout.callbacks import MCDropout


class DigitsMLP(L.LightningModule):
    def __init__(self, hidden: int = 256, p: float = 0.5, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), Dropout(p), nn.Linear(hidden, hidden), nn.ReLU(), Dropout(p),
            nn.Linear(hidden, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])  # MCDropout measures the MC and the deterministic prediction

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def datasets(seed: int) -> dict[str, TensorDataset]:
    """Train / validation / test digits and the three shifted sets (built from the test digits)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val, test = order[:1200], order[1200:1500], order[1500:]
    x_test = x[test]
    images = x_test.reshape(-1, 8, 8)
    noise = torch.rand(x_test.shape, generator=torch.Generator().manual_seed(seed + 1))
    return {
        "train": TensorDataset(x[train], y[train]),
        "validation": TensorDataset(x[val], y[val]),
        "test": TensorDataset(x_test, y[test]),
        "uniform noise": TensorDataset(noise, y[test]),
        "inverted digits": TensorDataset(1.0 - x_test, y[test]),
        "rotated 90 deg": TensorDataset(images.rot90(1, (1, 2)).reshape(-1, 64), y[test]),
    }


def deterministic_entropy(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)
    return torch.special.entr(probs).sum(-1)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse(__doc__, argv, epochs=40)
    n_samples = 8 if args.fast else 50
    L.seed_everything(args.seed, verbose=False)
    data = datasets(args.seed)
    model = DigitsMLP()
    common: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }

    def logger(run: str) -> TensorBoardLogger:
        return TensorBoardLogger(args.out, name="mc_ood", version=run)

    def loader(name: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(data[name], batch_size=100, shuffle=shuffle)

    validated = MCDropout(n_samples, stages="validate")
    fit = L.Trainer(max_epochs=args.epochs, callbacks=[validated], logger=logger("fit"), **common)
    fit.fit(model, loader("train", shuffle=True), loader("validation"))

    results: dict[str, dict[str, float]] = {}
    for name in ("uniform noise", "inverted digits", "rotated 90 deg"):
        callback = MCDropout(n_samples, stages="test", ood_dataloader_idx=1)
        tester = L.Trainer(callbacks=[callback], logger=logger("test_" + name.replace(" ", "_")), **common)
        measured = tester.test(model, [loader("test"), loader(name)], verbose=False)[0]
        inside = deterministic_entropy(model, data["test"].tensors[0])
        outside = deterministic_entropy(model, data[name].tensors[0])
        labels = torch.cat([torch.zeros(len(inside)), torch.ones(len(outside))]).long()
        measured["test/det/ood_auroc_entropy"] = binary_auroc(torch.cat([inside, outside]), labels).item()
        results.setdefault("calibration", {k: v for k, v in measured.items() if "ood" not in k})
        results[name] = {k.removeprefix("test/"): v for k, v in measured.items() if "ood" in k}

    calibration = results["calibration"]
    print(
        f"Held-out digits ({len(data['test'])}), MC dropout ({n_samples} passes) against one eval-mode pass:"
    )
    print(f"{'prediction':16s} {'accuracy':>9s} {'NLL':>7s} {'Brier':>7s} {'ECE':>7s}")
    for label, which in (("MC dropout", "mc"), ("deterministic", "det")):
        row = [calibration[f"test/{which}/{metric}"] for metric in ("accuracy", "nll", "brier", "ece")]
        print(f"{label:16s} {row[0]:9.3f} {row[1]:7.3f} {row[2]:7.3f} {row[3]:7.3f}")
    print(f"MC standard error of the mean probabilities: {calibration['test/mc/standard_error']:.4f}")
    print("\nOut-of-distribution detection (held-out digits against each shifted set):")
    header = "AUROC MC entropy", "AUROC MC BALD", "AUROC det entropy", "FPR95 MC entropy"
    print(f"{'shifted set':18s} " + " ".join(f"{h:>17s}" for h in header))
    for name in ("uniform noise", "inverted digits", "rotated 90 deg"):
        row = results[name]
        keys = ("mc/ood_auroc_entropy", "mc/ood_auroc_bald", "det/ood_auroc_entropy", "mc/ood_fpr95_entropy")
        print(f"{name:18s} " + " ".join(f"{row[key]:17.3f}" for key in keys))
    print(f"\nTensorBoard: tensorboard --logdir {args.out}/mc_ood")
    return results


if __name__ == "__main__":
    main()
