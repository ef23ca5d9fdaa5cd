"""scikit-learn's bundled handwritten digits (1797 8x8 images, no download), split by seed."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


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
