"""Rank-decorrelated, reproducible dropout masks under DDP.

``seed_everything`` seeds every rank identically, so without this callback every rank
applies the same dropout masks to its slice of the batch (huggingface/transformers#31412,
Lightning-AI/pytorch-lightning#16166). :class:`PerRankDropout` opens a
:class:`~lightning_dropout.random_streams.RankStreams` scope around each training batch
(``on_train_batch_start`` to ``on_train_batch_end``): the forward, the backward (with any
activation-checkpoint recomputation) and the optimizer step draw from a stream derived from
the run's seed, the global rank and the step; everything else keeps torch's global stream.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dropout._validation import check_bool
from lightning_dropout.random_streams import RankStreams

__all__ = ["PerRankDropout", "check_supported_strategy"]

# Sharding strategies keep their own RNG bookkeeping (DeepSpeed's activation-checkpoint
# RNG tracker) and shard the parameters that DropConnect masks and the monitors read; none
# of this is tested, so they are refused rather than half supported.
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def check_supported_strategy(trainer: pl.Trainer, caller: str) -> None:
    """Refuse the sharding strategies (FSDP, DeepSpeed, ModelParallel) at setup.

    lightning-dropout's callbacks support a single device and the DDP family ("ddp",
    "ddp_spawn", "ddp_find_unused_parameters_true", "ddp_notebook"), by global rank.

    Args:
        trainer: the trainer being set up.
        caller: the callback's name, used in the error message.

    Raises:
        RuntimeError: the trainer's strategy is one of the sharding strategies.

    Example:
        >>> check_supported_strategy(pl.Trainer(accelerator="cpu", logger=False), "PerRankDropout")
    """
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    refused = names.intersection(UNSUPPORTED_STRATEGIES)
    if refused:
        raise RuntimeError(
            f"{caller} does not support strategy {type(strategy).__name__}: lightning-dropout supports a "
            "single device and the DDP strategies ('ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true', "
            "'ddp_notebook'). Sharded strategies (FSDP, DeepSpeed, ModelParallel) are refused because "
            "their RNG tracking and parameter sharding are untested with per-rank dropout streams, "
            "DropConnect and the monitors."
        )


class PerRankDropout(Callback):
    """Give every DDP rank its own reproducible dropout masks (the default with the mixin).

    During each training batch, torch's global CPU generator and the rank's CUDA generator
    are reseeded with ``stream_seed(seed, global_rank, step)`` and restored afterwards, so:

    * ranks draw different masks on identical inputs (about half the elements of two
      ranks' ``p = 0.5`` masks agree, as for independent masks);
    * the same seed and world size reproduce every mask; a resumed run continues them
      (the state is ``{"seed", "step"}``, plain ints, identical on every rank);
    * model initialisation, samplers, dataloader worker seeds and validation see torch's
      global stream untouched: the training steps consume none of it;
    * torch's own dropout layers are covered as well as this package's.

    ``seed`` defaults to the run's seed, ``torch.initial_seed()`` at setup (the
    ``seed_everything`` seed when one was set), taken from rank 0 so all ranks agree.
    ``enabled=False`` restores the shared masks (torch's behaviour: every rank draws
    from identically seeded global generators) while keeping the callback in the list, which
    stops :class:`~lightning_dropout.DropoutMixin` from adding an enabled one.

    Args:
        enabled: decorrelate the ranks' masks (True) or leave torch's generators alone.
        seed: the streams' seed; None takes the run's seed at setup.

    Raises:
        TypeError: ``enabled`` is not a bool or ``seed`` not an int (or None).
        RuntimeError: at setup, when enabled, for FSDP / DeepSpeed / ModelParallel
            strategies, or for a multi-process run on an accelerator other than CPU or CUDA.

    Example:
        >>> callback = PerRankDropout()
        >>> trainer = pl.Trainer(accelerator="cpu", callbacks=[callback], logger=False)
        >>> callback.enabled
        True
    """

    def __init__(self, enabled: bool = True, seed: int | None = None) -> None:
        self.enabled = check_bool("enabled", enabled)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
        self.seed = seed
        self.streams: RankStreams | None = None
        self._loaded_state: dict[str, int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled:  # a disabled callback touches nothing, under any strategy
            return
        check_supported_strategy(trainer, type(self).__name__)
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        if device.type not in ("cpu", "cuda"):
            if trainer.world_size > 1:
                raise RuntimeError(
                    f"PerRankDropout covers the cpu and cuda generators, not {device.type!r}: ranks would "
                    "share dropout masks. Pass PerRankDropout(enabled=False) to accept that."
                )
            rank_zero_warn(f"PerRankDropout: nothing to decorrelate on one {device.type} device; disabled.")
            return
        # Every rank runs setup, so this broadcast is a collective all ranks join.
        seed = self.seed if self.seed is not None else torch.initial_seed()
        seed = trainer.strategy.broadcast(seed, src=0)
        accelerators = [device] if device.type == "cuda" else []
        # A second fit with the same callback continues the steps instead of repeating masks.
        step = self.streams.step if self.streams is not None else 0
        self.streams = RankStreams(seed, trainer.global_rank, accelerators, step)
        self.streams.load_state_dict(self._loaded_state)
        self._loaded_state = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.streams is not None:
            # A LightningModule whose on_train_batch_start returns -1 ends the epoch
            # without on_train_batch_end; the epoch-end hook closes that scope.
            self.streams.deactivate()
            self.streams.activate()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self.streams is not None:
            self.streams.deactivate()

    def state_dict(self) -> dict[str, Any]:
        if self.streams is not None:
            return self.streams.state_dict()
        return dict(self._loaded_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state: dict[str, int] = {key: int(state_dict[key]) for key in ("seed", "step") if key in state_dict}
        if self.streams is not None:
            self.streams.load_state_dict(state)
        else:  # loaded before setup (not Lightning's order, but a user's may differ)
            self._loaded_state = state
