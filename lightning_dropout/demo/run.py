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
    DigitsAutoencoder,
    FigureLogger,
    measure_autoencoder,
)
from lightning_dropout.demo.data import DigitsDataModule
from lightning_dropout.demo.experiments import DemoConfig, classifiers
from lightning_dropout.demo.measure import RunResult, measure_classifier

AUTOENCODERS = (("autoencoder_no_dropout", 0.0), ("autoencoder_dropout", 0.5))
AUTOENCODER_SPLIT = {"train_size": 1297, "val_size": 250}  # the other 250 digits are held out
CLASSIFIER_VAL_SIZE = 200


@dataclass
class DemoResult:
    """Everything the demo measured, and the seconds spent in ``trainer.fit``."""

    config: DemoConfig
    autoencoders: list[AutoencoderResult]
    runs: list[RunResult]
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
    config: DemoConfig,
    name: str,
    seed: int,
    epochs: int,
    callbacks: list[pl.Callback],
    log_every_n_steps: int = 50,
    check_val_every_n_epoch: int = 1,
) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        logger=TensorBoardLogger(config.out, name=name, version=f"seed{seed}"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps,
        check_val_every_n_epoch=check_val_every_n_epoch,
    )


def run_demo(config: DemoConfig, progress: Callable[[str], None] = print) -> DemoResult:
    """Train and measure the autoencoders (seed ``config.seed``) and every classifier over
    ``config.seed_list``; ``progress`` receives one line per run. Printing the tables and
    writing the files are the caller's (:func:`lightning_dropout.demo.write_outputs`)."""
    total = len(AUTOENCODERS) + len(classifiers(config)) * config.seeds
    done = 0
    fit_seconds = 0.0
    result = DemoResult(config, [], [], 0.0)

    def fit(trainer: pl.Trainer, model: pl.LightningModule, data: DigitsDataModule) -> float:
        nonlocal done, fit_seconds
        started = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - started
        done += 1
        fit_seconds += seconds
        return seconds

    with quiet_lightning(), torch_threads(config.threads):
        for name, p in AUTOENCODERS:
            pl.seed_everything(config.seed, verbose=False)
            autoencoder = DigitsAutoencoder(p=p)
            data = DigitsDataModule(batch_size=128, seed=config.seed, flatten=True, **AUTOENCODER_SPLIT)
            data.setup("fit")
            held_out = data.splits["test"].tensors[0]
            epochs = config.autoencoder_epochs
            callbacks: list[pl.Callback] = [FigureLogger(data.splits["val"].tensors[0], every_n_epochs=25)]
            trainer = _trainer(
                config, name, config.seed, epochs, callbacks, log_every_n_steps=10, check_val_every_n_epoch=25
            )
            seconds = fit(trainer, autoencoder, data)
            if trainer.is_global_zero:
                measured = measure_autoencoder(name, config.seed, autoencoder, held_out)
                result.autoencoders.append(measured)
                progress(
                    f"[{done:>2}/{total}] {name:<22} seed {config.seed:<3} {epochs:>4} epochs "
                    f"{seconds:6.1f} s   held-out BCE {measured.test_loss:.4f}, mean activation "
                    f"{float(measured.mean_activation.mean()):.3f}"
                )
        for seed in config.seed_list:
            for spec in classifiers(config):
                pl.seed_everything(seed, verbose=False)
                model = spec.build()
                data = DigitsDataModule(
                    seed=seed,
                    flatten=not spec.images,
                    train_size=config.train_size,
                    val_size=CLASSIFIER_VAL_SIZE,
                )
                trainer = _trainer(
                    config, spec.name, seed, config.max_epochs, spec.callbacks(), log_every_n_steps=5
                )
                seconds = fit(trainer, model, data)
                if trainer.is_global_zero:
                    run = measure_classifier(spec.name, seed, model, data)
                    result.runs.append(run)
                    progress(
                        f"[{done:>2}/{total}] {spec.name:<22} seed {seed:<3} {config.max_epochs:>4} epochs "
                        f"{seconds:6.1f} s   test error {run.test_error:.3f}, test NLL {run.test_nll:.3f}"
                    )
    result.fit_seconds = fit_seconds
    return result
