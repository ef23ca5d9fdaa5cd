"""Multi-process training on the CPU: 2 DDP processes (gloo), scheduler and monitors on.

Every rank sets the same scheduled p at every step; the monitors' statistics are reduced
over both ranks before rank 0 writes them to TensorBoard. The same script runs on GPUs
with ``--accelerator gpu --devices N``.

    python examples/ddp_cpu.py            # full run, logs under runs/examples
    python examples/ddp_cpu.py --fast     # a few seconds plus process start-up
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from _fast import parse
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_dropout import schedules
from lightning_dropout.callbacks import CoActivationMonitor, DropoutScheduler, DropRateMonitor
from lightning_dropout.demo import DigitsDataModule, DigitsMLP


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    extra = list(sys.argv[1:] if argv is None else argv)
    accelerator = "gpu" if "--gpu" in extra else "cpu"
    args = parse(__doc__, [a for a in extra if a != "--gpu"], epochs=10)
    pl.seed_everything(args.seed, verbose=False)
    model = DigitsMLP(width=64 if args.fast else 512, p=0.5)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=accelerator,
        devices=2,
        strategy="ddp_spawn",
        logger=TensorBoardLogger(args.out, name="ddp_cpu"),
        callbacks=[
            DropoutScheduler(schedules.Linear(0.1, 0.5, steps=0.5)),
            CoActivationMonitor(max_units=32),
            DropRateMonitor(),
        ],
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DigitsDataModule(seed=args.seed, flatten=True)
    trainer.fit(model, datamodule=data)
    rates = model.dropout_p()
    print(f"trained on {trainer.world_size} processes; p at the end: {rates}")
    return rates


if __name__ == "__main__":
    main()
