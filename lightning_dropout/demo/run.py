"""Run the demo: the autoencoders once, every classifier once per seed, one line per run."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_dropout.demo.autoencoder import (
    AutoencoderResult,
    FigureLogger,
    MnistAutoencoder,
    measure_autoencoder,
)
from lightning_dropout.demo.data import MnistDataModule
from lightning_dropout.demo.experiments import DemoConfig, classifiers
from lightning_dropout.demo.measure import ClassifierRun, EpochCurves

AUTOENCODERS = (("autoencoder_no_dropout", 0.0), ("autoencoder_dropout", 0.5))
AUTOENCODER_HELD_OUT = 1000
AUTOENCODER_BATCH = 64
CLASSIFIER_BATCH = 128


@dataclass
class DemoResult:
    """Everything the demo measured, and the seconds spent in ``trainer.fit``."""

    config: DemoConfig
    autoencoders: list[AutoencoderResult]
    runs: list[ClassifierRun]
    fit_seconds: float


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners (devices, tips) and its few-workers warning, so
    that each run prints one line."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            # Small --train-size runs have fewer batches than the logging interval.
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
            # Lightning 2.6 calls a deprecated torch pytree API on every fit.
            warnings.filterwarnings("ignore", message=r".*isinstance.treespec, LeafSpec.*")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trainer(
    config: DemoConfig, name: str, seed: int, epochs: int, callbacks: list[pl.Callback]
) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        logger=TensorBoardLogger(config.out, name=name, version=f"seed{seed}", default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=16,
    )


def run_demo(config: DemoConfig, progress: Callable[[str], None] = print) -> DemoResult:
    """Train and measure the autoencoders (seed ``config.seed``) and every classifier over
    ``config.seed_list``; ``progress`` receives one line per run. Printing the tables and
    writing the files are the caller's (:func:`lightning_dropout.demo.write_outputs`)."""
    specs = classifiers(config)
    total = len(AUTOENCODERS) + len(specs) * config.seeds
    done = 0
    result = DemoResult(config, [], [], 0.0)

    def fit(trainer: pl.Trainer, model: pl.LightningModule, data: MnistDataModule) -> float:
        nonlocal done
        started = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - started
        done += 1
        result.fit_seconds += seconds
        return seconds

    with quiet_lightning(), torch_threads(config.threads):
        for name, p in AUTOENCODERS:
            pl.seed_everything(config.seed, verbose=False)
            autoencoder = MnistAutoencoder(p=p)
            data = MnistDataModule(
                config.autoencoder_digits, AUTOENCODER_HELD_OUT, AUTOENCODER_BATCH, seed=config.seed
            )
            data.setup("fit")
            held_out = data.test.tensors[0]
            epochs = config.autoencoder_epochs
            trainer = _trainer(config, name, config.seed, epochs, [FigureLogger(held_out)])
            seconds = fit(trainer, autoencoder, data)
            if trainer.is_global_zero:
                measured = measure_autoencoder(name, config.seed, autoencoder, held_out)
                result.autoencoders.append(measured)
                progress(
                    f"[{done:>2}/{total}] {name:<22} seed {config.seed:<3} {epochs:>3} epochs "
                    f"{seconds:5.1f} s held-out BCE {measured.test_bce:5.1f}, "
                    f"mean activation {measured.mean_activation:.2f}, "
                    f"smoothness {measured.decoder_smoothness:.2f}"
                )
        for seed in config.seed_list:
            for spec in specs:
                pl.seed_everything(seed, verbose=False)
                model = spec.build()
                data = MnistDataModule(
                    config.train_size, config.test_size, CLASSIFIER_BATCH, seed=seed, flatten=not spec.images
                )
                data.setup("fit")
                run = ClassifierRun(spec.name, seed)
                (train_x, train_y), (test_x, test_y) = data.train.tensors, data.test.tensors
                curves = EpochCurves(run, (train_x, train_y), (test_x, test_y))
                trainer = _trainer(config, spec.name, seed, config.max_epochs, [*spec.callbacks(), curves])
                seconds = fit(trainer, model, data)
                if trainer.is_global_zero:
                    result.runs.append(run)
                    progress(
                        f"[{done:>2}/{total}] {spec.name:<22} seed {seed:<3} {config.max_epochs:>3} epochs "
                        f"{seconds:5.1f} s test error {run.test_error:.3f}, test NLL {run.test_nll_last:.3f} "
                        f"(best {run.test_nll_best:.3f} at epoch {run.best_epoch})"
                    )
    return result
