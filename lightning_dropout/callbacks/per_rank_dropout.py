"""Rank-decorrelated, reproducible dropout masks under DDP, FSDP and tensor parallelism.

``seed_everything`` seeds every rank identically, so without this callback every rank
applies the same dropout masks to its slice of the batch (huggingface/transformers#31412,
Lightning-AI/pytorch-lightning#16166). :class:`PerRankDropout` opens a
:class:`~lightning_dropout.random_streams.RankStreams` scope around each training batch
(``on_train_batch_start`` to ``on_train_batch_end``): the forward, the backward (with any
activation-checkpoint recomputation) and the optimizer step draw from a stream derived from
the run's seed, the data-parallel rank and the step; everything else keeps torch's global
stream. Under ``ModelParallelStrategy`` the ranks of a tensor-parallel group share a stream
(right for replicated activations) and the modules named in ``sharded_modules`` draw per
tensor-parallel rank (:class:`~lightning_dropout.random_streams.ShardedSites`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_dropout._validation import check_bool, check_seed
from lightning_dropout.callbacks._run import DropoutCallback
from lightning_dropout.callbacks._site_report import report_sites
from lightning_dropout.random_streams import RankStreams, ShardedSites, mesh_ranks
from lightning_dropout.selection import check_patterns

__all__ = ["PerRankDropout", "check_supported_strategy"]

UNSUPPORTED_STRATEGIES = ("DeepSpeedStrategy",)
TENSOR_PARALLEL_DIM = "tensor_parallel"  # ModelParallelStrategy's mesh: ("data_parallel", "tensor_parallel")


def check_supported_strategy(trainer: pl.Trainer, caller: str) -> None:
    """Refuse DeepSpeed at setup, saying why and what to use instead.

    lightning-dropout's callbacks support a single device, the DDP family, ``FSDPStrategy``
    and ``ModelParallelStrategy``. DeepSpeed's ZeRO engine and its own RNG tracker for
    activation checkpointing (``deepspeed.checkpointing``) are untested with the per-rank
    streams, DropConnect and the monitors.

    Args:
        trainer: the trainer being set up.
        caller: the callback's name, used in the error message.

    Raises:
        RuntimeError: the trainer's strategy is DeepSpeed.

    Example:
        >>> check_supported_strategy(pl.Trainer(accelerator="cpu", logger=False), "PerRankDropout")
    """
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names.intersection(UNSUPPORTED_STRATEGIES):
        raise RuntimeError(
            f"{caller} does not support strategy {type(strategy).__name__}: DeepSpeed's ZeRO engine and its "
            "own RNG tracker for activation checkpointing are untested with per-rank dropout streams, "
            "DropConnect and the monitors. For sharded training use strategy='fsdp' (FSDPStrategy) or "
            "ModelParallelStrategy, which are supported. To run DeepSpeed anyway with torch's shared "
            "masks (every data-parallel rank drawing the same ones), pass PerRankDropout(enabled=False) "
            "in Trainer(callbacks=...); DropoutMixin modules add an enabled PerRankDropout otherwise."
        )


class PerRankDropout(DropoutCallback):
    """Give every data-parallel rank its own reproducible dropout masks (the default with the mixin).

    During each training batch, torch's global CPU generator and the rank's CUDA generator
    are reseeded with ``stream_seed(seed, data_parallel_rank, step)`` and restored
    afterwards, so:

    * data-parallel ranks draw different masks on identical inputs (about half the elements
      of two ranks' ``p = 0.5`` masks agree, as for independent masks);
    * the same seed and world size reproduce every mask; a resumed run continues them
      (the state is ``{"seed", "step"}``, plain ints, identical on every rank);
    * model initialisation, samplers, dataloader worker seeds and validation see torch's
      global stream untouched: the training steps consume none of it;
    * torch's own dropout layers are covered as well as this package's.

    The data-parallel rank is the global rank under DDP and ``FSDPStrategy``. Under
    ``ModelParallelStrategy`` it is the coordinate on the mesh's ``"data_parallel"``
    dimension: the ranks of a tensor-parallel group draw the same masks, which is right
    for activations they hold whole (replicated). Name the modules whose activations are
    sharded across the group in ``sharded_modules``: their forwards (and every dropout site
    inside them) draw per tensor-parallel rank as well (in every stage: MC dropout included).

    ``seed`` defaults to the run's seed, ``torch.initial_seed()`` at setup (the
    ``seed_everything`` seed when one was set), taken from rank 0 so all ranks agree.
    ``enabled=False`` restores the shared masks (torch's behaviour: every rank draws
    from identically seeded global generators) while keeping the callback in the list, which
    stops :class:`~lightning_dropout.DropoutMixin` from adding an enabled one.

    Args:
        enabled: decorrelate the ranks' masks (True) or leave torch's generators alone.
        seed: the streams' seed; None takes the run's seed at setup.
        sharded_modules: globs on qualified module names (a glob naming a module covers
            everything below it) of the modules whose activations are sharded across the
            tensor-parallel group, e.g. ``["layers.*.attention"]``; see
            :class:`~lightning_dropout.random_streams.ShardedSites`.

    Raises:
        TypeError: ``enabled`` is not a bool, ``seed`` not an int (or None),
            ``sharded_modules`` not a glob string, a list of them or None.
        RuntimeError: at setup, when enabled, for DeepSpeed, or for a multi-process run on
            an accelerator other than CPU or CUDA.
        ValueError: an empty ``sharded_modules`` glob; when the model is set up, a glob
            that matches no module.

    Example:
        >>> callback = PerRankDropout(sharded_modules=["blocks.*.attn"])
        >>> trainer = pl.Trainer(accelerator="cpu", callbacks=[callback], logger=False)
        >>> callback.enabled, callback.sharded_modules
        (True, ['blocks.*.attn'])
    """

    def __init__(
        self, enabled: bool = True, seed: int | None = None, sharded_modules: str | list[str] | None = None
    ) -> None:
        self.enabled = check_bool("enabled", enabled)
        self.seed = check_seed("seed", seed)
        self.sharded_modules = check_patterns("sharded_modules", sharded_modules) or []
        self._loaded_state: dict[str, int] = {}
        self._forget_run()

    def _forget_run(self) -> None:
        super()._forget_run()
        # The streams hold the process's global generators: a copy keeps their state only.
        self.streams: RankStreams | None = None
        self.sharded: ShardedSites | None = None
        self._tensor_rank: int | None = None  # set by setup when the callback is active
        self._devices: list[torch.device] = []

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_loaded_state"] = self.state_dict()  # a copy continues the streams
        return state

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled:  # a disabled callback touches nothing, under any strategy
            return
        check_supported_strategy(trainer, type(self).__name__)
        device = trainer.strategy.root_device
        if device.type not in ("cpu", "cuda"):
            if trainer.world_size > 1:
                raise RuntimeError(
                    f"PerRankDropout covers the cpu and cuda generators, not {device.type!r}: ranks would "
                    "share dropout masks. Pass PerRankDropout(enabled=False) to accept that."
                )
            rank_zero_warn(f"PerRankDropout: nothing to decorrelate on one {device.type} device; disabled.")
            return
        self._devices = [device] if device.type == "cuda" else []
        data_rank, self._tensor_rank = self._ranks(trainer)
        if stage != "fit":
            return
        # Every rank runs setup, so this broadcast is a collective all ranks join.
        seed = self.seed if self.seed is not None else torch.initial_seed()
        seed = trainer.strategy.broadcast(seed, src=0)
        # A second fit with the same callback continues the steps instead of repeating masks.
        step = self.streams.step if self.streams is not None else 0
        self.streams = RankStreams(seed, data_rank, self._devices, step)
        self.streams.load_state_dict(self._loaded_state)
        self._loaded_state = {}

    def _ranks(self, trainer: pl.Trainer) -> tuple[int, int]:
        strategy = trainer.strategy
        if not isinstance(strategy, ModelParallelStrategy):
            return trainer.global_rank, 0
        # The mesh exists once the strategy's environment is set up, before this hook.
        mesh = strategy.device_mesh
        if mesh[TENSOR_PARALLEL_DIM].size() > 1 and not self.sharded_modules:
            rank_zero_info(
                "PerRankDropout: every dropout site draws the same masks across the tensor-parallel group "
                "(right for replicated activations). Name the modules whose activations are sharded across "
                "it in PerRankDropout(sharded_modules=[...]) to give each shard its own masks."
            )
        return mesh_ranks(mesh, TENSOR_PARALLEL_DIM)

    def _mark_sharded_modules(self, pl_module: pl.LightningModule) -> None:
        # Not in setup: configure_model, which may build the modules, runs after it.
        if self._tensor_rank is not None and self.sharded_modules and self.sharded is None:
            self.sharded = ShardedSites(pl_module, self.sharded_modules, self._tensor_rank, self._devices)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark_sharded_modules(pl_module)

    # Every stage's forwards draw per tensor-parallel rank at the sharded modules.
    on_validation_start = on_test_start = on_predict_start = on_fit_start

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:  # the mixin's default callback: its users see the site table too
            report_sites(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.enabled:
            self.check_modes(trainer, pl_module, batch_idx)
        if self.streams is not None:
            # A LightningModule whose on_train_batch_start returns -1 ends the epoch
            # without on_train_batch_end; the epoch-end hook closes that scope.
            self.streams.deactivate()
            self.streams.activate()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()
        if self.sharded is not None:
            self.sharded.remove()
            self.sharded = None

    def _close(self) -> None:
        if self.streams is not None:
            self.streams.deactivate()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.streams is not None:
            return self.streams.state_dict()
        return dict(self._loaded_state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state: dict[str, int] = {key: int(state_dict[key]) for key in ("seed", "step") if key in state_dict}
        if self.streams is not None:
            self.streams.load_state_dict(state)
        else:  # loaded before setup (not Lightning's order, but a user's may differ)
            self._loaded_state = state
