"""DropoutMixin and DropoutScheduler on an over-sized MLP for the digits.

Two layer groups get their own schedules: the first hidden layer's dropout rises linearly
from 0 to 0.5 over the first half of training, the second follows Curriculum Dropout
(Morerio et al. 2017: p = 0.5 (1 - exp(-gamma t))). DropRateMonitor logs each layer's p
beside the drop rate it realised; the mixin reads and sets rates by layer name.

    python examples/scheduled_mlp.py            # full run, logs under runs/examples
    python examples/scheduled_mlp.py --fast     # a few seconds
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from _fast import parse
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_dropout import schedules
from lightning_dropout.callbacks import DropoutScheduler, DropRateMonitor
from lightning_dropout.demo import DigitsDataModule, DigitsMLP


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse(__doc__, argv, epochs=30)
    pl.seed_everything(args.seed, verbose=False)
    model = DigitsMLP(width=64 if args.fast else 1024, p=0.5)
    print("dropout layers:", list(model.dropout_layers()))
    scheduler = DropoutScheduler(
        {
            "net.drop1": schedules.Linear(0.0, 0.5, steps=0.5),
            "net.drop2": schedules.Curriculum(0.5, gamma=0.01),
        }
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=TensorBoardLogger(args.out, name="scheduled_mlp"),
        callbacks=[scheduler, DropRateMonitor()],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        enable_model_summary=False,
    )
    data = DigitsDataModule(seed=args.seed, flatten=True)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    rates = model.dropout_p()
    print(f"p after {trainer.global_step} steps:", {name: round(p, 3) for name, p in rates.items()})
    print(f"test accuracy: {result['test/accuracy']:.3f}")
    return rates


if __name__ == "__main__":
    main()
