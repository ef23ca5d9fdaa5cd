"""The active-learning loop as a Lightning callback: one round per training epoch."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_dropout._validation import check_bool, check_choice, check_int, check_positive, check_seed
from lightning_dropout.active.acquisition import SCORES, bald, batch_bald, power_bald, random, select
from lightning_dropout.active.data import ActiveDataModule
from lightning_dropout.mc import mc_predict

ACQUISITIONS = ("bald", "max_entropy", "margin", "variation_ratio", "random", "batch_bald", "power_bald")


class ActiveLearningLoop(pl.Callback):
    """Train, score the pool with MC dropout, label the best ``acquire`` examples; repeat.

    Each training epoch is one round on the labelled set of an :class:`ActiveDataModule`
    (so ``max_epochs = rounds + 1``, and the Trainer needs
    ``reload_dataloaders_every_n_epochs=1`` to see the new labels). At the end of every
    epoch the loop measures test accuracy and NLL (the deterministic network, eval mode),
    and, except after the last epoch, scores a random subsample of the pool with
    ``n_samples`` Monte-Carlo dropout passes (:func:`~lightning_dropout.mc.mc_predict`,
    batched; an ``nn.Sequential`` network runs its deterministic prefix once per batch),
    and labels the ``acquire`` examples the acquisition function picks. Unless
    ``warm_start``, each round trains from the first round's initial weights with a fresh
    optimizer state.

    Logged per round to every logger, with the number of labels as the step:
    ``active/labelled``, ``active/test_accuracy``, ``active/test_nll``, and to TensorBoard
    the histogram ``active/scores`` of the pool's acquisition scores (BALD for
    ``batch_bald`` and ``power_bald``). :attr:`history` holds the same numbers.

    DDP: every rank scores its share of the subsample, the probabilities are gathered, every
    rank computes the same acquisition from them, and rank 0's choice is broadcast; the
    labelled set is the same on every rank.

    Args:
        acquire: examples labelled per round.
        acquisition: one of ``bald``, ``max_entropy``, ``margin``, ``variation_ratio``,
            ``random``, ``batch_bald``, ``power_bald``.
        n_samples: Monte-Carlo passes per pool example.
        pool_subsample: pool examples scored per round (drawn at random); None scores the
            whole pool.
        warm_start: keep training the same weights across rounds instead of restarting
            from the initial ones.
        seed: the seed of the subsample, the passes and the random acquisitions.
        network: the attribute of the LightningModule holding the network to score (an
            ``nn.Sequential`` gets its deterministic prefix run once); None calls the
            LightningModule itself. It maps inputs to class logits.
        beta: ``power_bald``'s power.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: a count below its minimum or an unknown ``acquisition``.

    Example:
        >>> loop = ActiveLearningLoop(acquire=10, acquisition="bald", pool_subsample=2000)
        >>> loop.history
        []
    """

    def __init__(
        self,
        acquire: int = 10,
        acquisition: str = "bald",
        n_samples: int = 20,
        pool_subsample: int | None = None,
        warm_start: bool = False,
        seed: int = 0,
        network: str | None = None,
        beta: float = 1.0,
    ) -> None:
        self.acquire = check_int("acquire", acquire, minimum=1)
        self.acquisition = check_choice("acquisition", acquisition, ACQUISITIONS)
        self.n_samples = check_int("n_samples", n_samples, minimum=1)
        self.pool_subsample = (
            None if pool_subsample is None else check_int("pool_subsample", pool_subsample, minimum=1)
        )
        self.warm_start = check_bool("warm_start", warm_start)
        self.seed = check_seed("seed", seed) or 0
        if network is not None and not isinstance(network, str):
            raise TypeError(
                f"network must be an attribute name or None, got {type(network).__name__} {network!r}"
            )
        self.network = network
        self.beta = check_positive("beta", beta)
        self.history: list[dict[str, float]] = []
        self.last_scored = 0
        self._initial: dict[str, Tensor] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.datamodule, ActiveDataModule):  # type: ignore[attr-defined]
            raise TypeError(
                "ActiveLearningLoop needs an ActiveDataModule passed to trainer.fit(datamodule=...)"
            )
        reload = getattr(trainer, "reload_dataloaders_every_n_epochs", None)  # set by a connector
        if reload != 1:
            raise ValueError(
                "ActiveLearningLoop needs Trainer(reload_dataloaders_every_n_epochs=1) so that every "
                f"round trains on the new labels, got {reload}"
            )
        self._scored_network(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._initial is None:  # a resumed run has them from the checkpoint
            self._initial = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.warm_start or trainer.current_epoch == 0 or self._initial is None:
            return
        pl_module.load_state_dict(self._initial)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data: ActiveDataModule = trainer.datamodule  # type: ignore[attr-defined]
        network = self._scored_network(pl_module)
        was_training = network.training
        network.eval()
        try:
            record: dict[str, float] = {"labelled": float(len(data.labelled))}
            if data.test_dataset is not None:
                record.update(self._test(trainer, network, data))
            scores = None
            bound = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
            last = bound is not None and trainer.current_epoch + 1 >= bound  # no acquisition after training
            if not last and len(data.pool) > 0:
                scores = self._acquire(trainer, network, data)
        finally:
            network.train(was_training)
        self.history.append(record)
        step = int(record["labelled"])
        for logger in trainer.loggers:
            logger.log_metrics({f"active/{name}": value for name, value in record.items()}, step=step)
            if scores is not None and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("active/scores", scores, global_step=step)

    def _scored_network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.network is None:
            return pl_module
        network = getattr(pl_module, self.network, None)
        if not isinstance(network, nn.Module):
            raise ValueError(
                f"network={self.network!r} names no nn.Module attribute of {type(pl_module).__name__}"
            )
        return network

    def _test(self, trainer: pl.Trainer, network: nn.Module, data: ActiveDataModule) -> dict[str, float]:
        """Accuracy and NLL on the test set, each rank summing over its share."""
        assert data.test_dataset is not None
        rank, world = trainer.global_rank, trainer.world_size
        share = torch.arange(rank, len(data.test_dataset), world)  # type: ignore[arg-type]
        device = next(network.parameters()).device
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        with torch.no_grad():
            for inputs, targets in data.subset_dataloader(data.test_dataset, share):
                inputs, targets = move_data_to_device((inputs, targets), device)
                logits = network(inputs)
                totals[0] += (logits.argmax(-1) == targets).sum()
                totals[1] += F.cross_entropy(logits.double(), targets, reduction="sum")
                totals[2] += len(targets)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        return {"test_accuracy": float(totals[0] / totals[2]), "test_nll": float(totals[1] / totals[2])}

    def _acquire(self, trainer: pl.Trainer, network: nn.Module, data: ActiveDataModule) -> Tensor:
        """Score the pool subsample (each rank its share), label ``acquire`` examples, return the scores."""
        epoch = trainer.current_epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        pool = data.pool
        candidates = pool[torch.randperm(len(pool), generator=generator)][: self.pool_subsample]
        probs = self._gathered_probs(trainer, network, data, candidates)
        k = min(self.acquire, len(candidates))
        if self.acquisition == "batch_bald":
            chosen, scores = batch_bald(probs, k, generator=generator), bald(probs)
        elif self.acquisition == "power_bald":
            chosen, scores = power_bald(probs, k, self.beta, generator=generator), bald(probs)
        else:
            scores = (
                random(probs, generator) if self.acquisition == "random" else SCORES[self.acquisition](probs)
            )
            chosen = select(scores, k)
        # Every rank computed the same choice from the same probabilities; broadcasting rank
        # 0's makes that exact even where kernels differ between devices.
        chosen = trainer.strategy.broadcast(chosen, src=0)
        data.label(candidates[chosen])
        return scores

    def _gathered_probs(
        self, trainer: pl.Trainer, network: nn.Module, data: ActiveDataModule, candidates: Tensor
    ) -> Tensor:
        """MC probabilities ``[S, N, C]`` of every candidate, on CPU, from every rank's share."""
        rank, world = trainer.global_rank, trainer.world_size
        share = candidates[rank::world]
        device = next(network.parameters()).device
        parts = []
        for batch_index, (inputs, _) in enumerate(data.subset_dataloader(data.dataset, share)):
            inputs = move_data_to_device(inputs, device)
            seed = ((self.seed * 1_000_003 + trainer.current_epoch) * world + rank) * 100_003 + batch_index
            out = mc_predict(network, inputs, self.n_samples, return_samples=True, seed=seed % 2**62)
            assert out.samples is not None
            parts.append(out.samples)
        self.last_scored = len(share)
        if world == 1:
            return torch.cat(parts, 1).cpu()
        width = math.ceil(len(candidates) / world)
        mine = torch.cat(parts, 1) if parts else None
        most_classes = torch.tensor(0 if mine is None else mine.shape[-1], device=device)
        n_classes = int(trainer.strategy.reduce(most_classes, reduce_op="max"))
        padded = torch.zeros(self.n_samples, width, n_classes, device=device)
        if mine is not None:
            padded[:, : mine.shape[1]] = mine
        gathered = trainer.strategy.all_gather(padded).cpu()  # [world, S, width, C]
        probs = torch.empty(self.n_samples, len(candidates), n_classes)
        for r in range(world):
            count = len(candidates[r::world])
            probs[:, r::world] = gathered[r, :, :count]
        return probs

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(record) for record in self.history], "initial": self._initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(record) for record in state_dict.get("history", [])]
        self._initial = state_dict.get("initial")
