"""An AWD-LSTM-style classifier on digits read row by row: embedding dropout, locked
dropout and weight drop, scheduled, monitored and sampled.

AWD-LSTM (Merity et al., ICLR 2018) regularises an LSTM with three kinds of dropout, all
here: EmbeddingDropout drops whole tokens of the vocabulary for a batch (here the 17
pixel intensities of scikit-learn's 8x8 digits), LockedDropout drops features with one
mask per sequence shared by every time step (on the LSTM's input and output), and
DropConnect on the recurrent weights ``weight_hh_l0`` ("weight drop") uses one mask for
all time steps. Each image is a sequence of 8 rows; a row is the embeddings of its 8
pixels side by side. DropoutScheduler ramps the locked dropout up, DropRateMonitor logs
every site's p and realised rate, and Monte-Carlo dropout gives predictive entropies.

    python examples/awd_lstm.py            # full run, logs under runs/examples
    python examples/awd_lstm.py --fast     # a few seconds
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _fast import parse
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import DropConnect, DropoutMixin, EmbeddingDropout, LockedDropout
from lightning_dropout.callbacks import DropoutScheduler, DropRateMonitor
from lightning_dropout.schedules import Constant, Linear

INTENSITIES = 17  # digits pixels take the values 0..16


class RowLSTM(DropoutMixin, pl.LightningModule):
    def __init__(self, embedding: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.embed = EmbeddingDropout(nn.Embedding(INTENSITIES, embedding), p=0.1)
        self.input_drop = LockedDropout(0.2)
        self.lstm = DropConnect(
            nn.LSTM(8 * embedding, hidden, batch_first=True), 0.3, names=("weight_hh_l0",)
        )
        self.output_drop = LockedDropout(0.3)
        self.head = nn.Linear(hidden, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        rows = self.embed(pixels).flatten(2)  # (batch, 8 rows, 8 pixels x embedding)
        out, _ = self.lstm(self.input_drop(rows))
        return self.head(self.output_drop(out)[:, -1])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    pixels = torch.as_tensor(data.images, dtype=torch.long)  # (1797, 8, 8), values 0..16
    labels = torch.as_tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1400], order[1400:]
    return TensorDataset(pixels[train], labels[train]), TensorDataset(pixels[test], labels[test])


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse(__doc__, argv, epochs=30)
    pl.seed_everything(args.seed, verbose=False)
    train, test = digits(args.seed)
    model = RowLSTM(hidden=32 if args.fast else 64)
    logger = TensorBoardLogger(args.out, name="awd_lstm")
    steps = args.epochs * -(-len(train) // 64)
    scheduler = DropoutScheduler(
        {"*drop": Linear(0.0, 0.3, steps=steps // 2), "embed": Constant(0.1), "lstm": Constant(0.3)}
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[scheduler, DropRateMonitor()],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
    (result,) = trainer.test(model, DataLoader(test, batch_size=512), verbose=False)
    x, y = test.tensors
    mc = model.mc_predict(x, n_samples=20, batched=False)
    right = mc.mean.argmax(1) == y
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    summary = {"test/accuracy": result["test/accuracy"], "mc/accuracy": right.float().mean().item()}
    for site in ("embed", "input_drop", "output_drop"):  # means over the measured steps
        for leaf in ("p", "realised"):
            values = [e.value for e in events.Scalars(f"dropout/{site}/{leaf}")]
            summary[f"{site}/{leaf}"] = sum(values) / len(values)
    summary["entropy/right"] = mc.entropy[right].mean().item()  # type: ignore[index]
    summary["entropy/wrong"] = mc.entropy[~right].mean().item() if (~right).any() else float("nan")  # type: ignore[index]
    for name, value in summary.items():
        print(f"{name}: {value:.3f}")
    return summary


if __name__ == "__main__":
    main()
