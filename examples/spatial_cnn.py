"""SpatialDropout (Dropout2d) in a small CNN, watched by ChannelDropMonitor.

Tompson et al. (CVPR 2015): neighbouring pixels of a feature map are correlated, so
dropping single elements barely regularizes a CNN; Dropout2d drops whole channels. The
monitor logs, per layer, the fraction of channels actually dropped beside the expected p
(channel_drop/<layer>/fraction and .../expected) and a histogram of how often each
channel was dropped. This script prints the logged fractions at the end.

    python examples/spatial_cnn.py            # full run, logs under runs/examples
    python examples/spatial_cnn.py --fast     # a few seconds
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from _fast import parse
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dropout.callbacks import ChannelDropMonitor
from lightning_dropout.demo import DigitsCNN, DigitsDataModule


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    args = parse(__doc__, argv, epochs=20)
    pl.seed_everything(args.seed, verbose=False)
    model = DigitsCNN(channels=(8, 16) if args.fast else (16, 32), p=0.3)
    logger = TensorBoardLogger(args.out, name="spatial_cnn")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[ChannelDropMonitor()],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        enable_model_summary=False,
    )
    data = DigitsDataModule(seed=args.seed)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    summary = {}
    for layer in ("net.drop1", "net.drop2"):
        fractions = [e.value for e in events.Scalars(f"channel_drop/{layer}/fraction")]
        expected = events.Scalars(f"channel_drop/{layer}/expected")[-1].value
        summary[layer] = (sum(fractions) / len(fractions), expected)
        print(f"{layer}: dropped {summary[layer][0]:.3f} of channels on average, expected {expected:.3f}")
    print(f"test accuracy: {result['test/accuracy']:.3f}")
    return summary


if __name__ == "__main__":
    main()
