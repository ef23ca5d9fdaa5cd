"""The run's shared TensorBoard dashboard and the logger plumbing of the monitors.

Every monitor (and MCDropout) registers its custom-scalars charts in ``setup``; the first
``on_train_start`` writes the merged layout once per run, because TensorBoard keeps one
layout per writer (the run's state: :mod:`lightning_dropout.callbacks._run`). Warnings
about loggers are given once per run however many monitors share it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from lightning_dropout.callbacks._run import Charts, run_state, warn_once

RATE_CATEGORY = "dropout: p beside the realised rate"
COACTIVATION_CATEGORY = "co-adaptation per layer"
CHANNEL_CATEGORY = "channel drop beside its expectation"


def tag_prefix(layer_name: str) -> str:
    """The tag path of a layer: its module name (``"model"`` for the root module)."""
    return layer_name or "model"


def site_charts(family: str, names: Iterable[str], leaves: str) -> Charts:
    r"""One chart per site (titled with its tag path) of the tags ``family/<site>/<leaf>``
    for the leaves alternation ``leaves``.

    Example:
        >>> site_charts("dropout", ["enc.drop"], "p|realised")
        {'enc.drop': ['dropout/enc\\.drop/(p|realised)$']}
    """
    return {tag_prefix(name): [f"{family}/{re.escape(tag_prefix(name))}/({leaves})$"] for name in names}


def register_charts(trainer: pl.Trainer, category: str, charts: Charts, rates: bool = True) -> None:
    """Add Multiline charts to the run's layout (call before ``on_train_start``).

    Every contributor gets the common rate chart, which also shows the scheduler's
    ``dropout/<group>/p`` tags, unless ``rates`` is False.
    """
    run = run_state(trainer)
    if rates:
        rate_charts = run.categories.setdefault(RATE_CATEGORY, {})
        rate_charts.setdefault("p and realised, all layers", [r"dropout/.*/p$", r"dropout/.*/realised$"])
    section = run.categories.setdefault(category, {})
    for title, regexes in charts.items():
        section.setdefault(title, regexes)


def write_layout(trainer: pl.Trainer) -> None:
    """Write the merged custom-scalars layout to every TensorBoard logger, once per run."""
    run = run_state(trainer)
    if run.layout_written or not run.categories:
        return
    run.layout_written = True
    layout = {
        category: {title: ["Multiline", regexes] for title, regexes in charts.items()}
        for category, charts in run.categories.items()
    }
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_custom_scalars(layout)


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def check_loggers(trainer: pl.Trainer, monitor: str) -> bool:
    """Whether there is a logger to write to; warn once per run about what is skipped.

    ``fast_dev_run`` swaps the loggers for a DummyLogger: nothing to write, nothing to say.
    """
    if trainer.loggers and all(isinstance(logger, DummyLogger) for logger in trainer.loggers):
        return False
    if not trainer.loggers:
        warn_once(
            trainer, "no-logger", f"{monitor}: the trainer has no logger; the dropout monitors do nothing."
        )
        return False
    others = [
        type(logger).__name__ for logger in trainer.loggers if not isinstance(logger, TensorBoardLogger)
    ]
    if others:
        warn_once(
            trainer,
            "other-loggers",
            f"The dropout monitors send their scalars to every logger, but images and histograms "
            f"only to TensorBoardLogger; skipped for {', '.join(others)}.",
        )
    return True


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send ``metrics`` to every logger (loggers write on rank zero only)."""
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> None:
    if trainer.is_global_zero:
        for logger in tensorboard_loggers(trainer):
            logger.experiment.add_histogram(tag, values.detach().float().cpu(), global_step=step, bins="auto")


def log_png(trainer: pl.Trainer, tag: str, png: bytes, height: int, width: int, step: int) -> None:
    """Log an already PNG-encoded image to every TensorBoard logger.

    The monitors encode their own images: ``add_image`` compresses RGB at zlib level 6,
    which on a noisy correlation heatmap costs several training steps.
    """
    if not trainer.is_global_zero:
        return
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    summary = Summary(value=[Summary.Value(tag=tag, image=image)])
    for logger in tensorboard_loggers(trainer):
        # torch's and tensorboardX's SummaryWriter both open their FileWriter when built.
        logger.experiment.file_writer.add_summary(summary, step)
