"""The labelled / pool split of a dataset for active learning, as a LightningDataModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from lightning_dropout._validation import check_int, check_seed


class ActiveDataModule(pl.LightningDataModule):
    """A dataset split into a labelled set (trained on) and a pool (scored, then labelled).

    Training serves the labelled examples only; :meth:`label` moves pool examples into the
    labelled set (the dataset's own targets play the oracle). The split is a plain list of
    indices into ``dataset``, kept in :meth:`state_dict`, so a checkpoint holds it and a
    resumed run trains on the labelled set it had. Every process builds the same initial
    split from ``seed``, and :class:`~lightning_dropout.active.ActiveLearningLoop` labels the
    same examples on every process, so DDP ranks always agree on it.

    A tiny labelled set makes epochs of one or two batches; ``batches_per_epoch`` instead
    draws a fixed number of batches per epoch from it (with replacement), so that each
    round of the loop trains for the same number of steps whatever the labelled count.

    Args:
        dataset: every example, labelled or not; items are ``(input, target)``.
        test_dataset: held-out examples for the loop's test metrics, or None.
        initial_labelled: the first labelled examples: their indices into ``dataset``, or
            a count drawn at random from ``seed``.
        batch_size: examples per training batch.
        batches_per_epoch: batches per training epoch, drawn with replacement from the
            labelled set; None for one pass over it.
        seed: the seed of the initial draw and of the training order.
        eval_batch_size: examples per batch when the pool and test set are scored.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: a count below its minimum, more initial labels than examples, or an
            initial index out of range or repeated.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> dataset = TensorDataset(torch.randn(10, 3), torch.arange(10))
        >>> data = ActiveDataModule(dataset, initial_labelled=[0, 5])
        >>> data.label(torch.tensor([7]))
        >>> data.labelled.tolist(), len(data.pool)
        ([0, 5, 7], 7)
        >>> data.state_dict()
        {'labelled': [0, 5, 7], 'dataset_size': 10}
    """

    def __init__(
        self,
        dataset: Dataset,
        test_dataset: Dataset | None = None,
        initial_labelled: int | Sequence[int] = 20,
        batch_size: int = 32,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        eval_batch_size: int = 512,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.test_dataset = test_dataset
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.batches_per_epoch = (
            None
            if batches_per_epoch is None
            else check_int("batches_per_epoch", batches_per_epoch, minimum=1)
        )
        self.seed = check_seed("seed", seed)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, minimum=1)
        size = len(dataset)  # type: ignore[arg-type]
        if isinstance(initial_labelled, (Sequence, Tensor)):
            first = [
                check_int("initial_labelled index", int(i) if isinstance(i, Tensor) else i, minimum=0)
                for i in initial_labelled
            ]
        else:
            count = check_int("initial_labelled", initial_labelled, minimum=0)
            if count > size:
                raise ValueError(f"initial_labelled must be at most the {size} examples, got {count}")
            generator = torch.Generator().manual_seed(self.seed or 0)
            first = torch.randperm(size, generator=generator)[:count].tolist()
        # Plain Python, not tensors: ddp_spawn hands tensors to the ranks in shared memory, and
        # each rank labelling the same examples in one shared mask would see them taken.
        self._size = size
        self._labelled: list[int] = []
        self._is_labelled: set[int] = set()
        self.label(first)

    @property
    def labelled(self) -> Tensor:
        """Indices into ``dataset`` of the labelled examples, in the order they were labelled."""
        return torch.tensor(self._labelled, dtype=torch.long)

    @property
    def pool(self) -> Tensor:
        """Indices into ``dataset`` of the unlabelled examples, ascending."""
        return torch.tensor([i for i in range(self._size) if i not in self._is_labelled], dtype=torch.long)

    def label(self, indices: Tensor | Sequence[int]) -> None:
        """Move the pool examples at these ``dataset`` indices into the labelled set.

        Raises:
            ValueError: an index is out of range, repeated, or already labelled.
        """
        new = [int(i) for i in indices]
        if any(not 0 <= i < self._size for i in new):
            raise ValueError(f"indices must be in [0, {self._size}), got {new}")
        if len(set(new)) != len(new) or not self._is_labelled.isdisjoint(new):
            raise ValueError(f"indices must be distinct pool examples, got {new}")
        self._labelled.extend(new)
        self._is_labelled.update(new)

    def train_dataloader(self) -> DataLoader:
        labelled = Subset(self.dataset, self._labelled)
        # The order depends on the labelled count, not on the epoch: a resumed run draws what
        # the uninterrupted one would.
        generator = torch.Generator().manual_seed((self.seed or 0) * 1_000_003 + len(self._labelled))
        if self.batches_per_epoch is None:
            sampler = RandomSampler(labelled, generator=generator)
        else:
            draws = self.batches_per_epoch * self.batch_size
            sampler = RandomSampler(labelled, replacement=True, num_samples=draws, generator=generator)
        return DataLoader(labelled, batch_size=self.batch_size, sampler=sampler)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise ValueError("ActiveDataModule was given no test_dataset")
        return DataLoader(self.test_dataset, batch_size=self.eval_batch_size)

    def subset_dataloader(self, dataset: Dataset, indices: Tensor) -> DataLoader:
        """Batches of ``dataset[indices]`` in order, for scoring."""
        return DataLoader(Subset(dataset, indices.tolist()), batch_size=self.eval_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"labelled": list(self._labelled), "dataset_size": self._size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        size = state_dict.get("dataset_size", self._size)
        if size != self._size:
            raise ValueError(
                f"the checkpoint's labelled set indexes a dataset of {size} examples, "
                f"this one has {self._size}"
            )
        self._labelled = []
        self._is_labelled = set()
        self.label(state_dict["labelled"])
