"""Drawing Monte-Carlo passes: looped, or batched on the input replicated along dim 0.

Batched, the input is replicated replica-major along dimension 0 and run in one forward
call per chunk of replicas; every layer that draws one weight mask per call gets one per
replica (:func:`~lightning_dropout.mc.modes.independent_replica_masks`). Batches are
walked with ``lightning_utilities``' ``apply_to_collection`` (the walker Lightning uses), so
tuples, lists, mappings, named tuples and dataclasses of tensors all work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_dropout._validation import check_int, check_positive_int
from lightning_dropout.consistent_masks import ConsistentMasks
from lightning_dropout.mc.modes import independent_replica_masks
from lightning_dropout.random_streams import default_generators

DEFAULT_MAX_ROWS = 1024


def replicate(batch: Any, replicas: int) -> Any:
    """Stack ``replicas`` copies of every tensor of ``batch`` along dim 0, replica-major.

    Tensors inside tuples, lists, mappings and dataclasses are replicated; anything else is
    passed on. Copy ``i`` occupies rows ``[i * B, (i + 1) * B)``.

    Args:
        batch: a tensor or a (nested) collection of them.
        replicas: the number of copies.

    Raises:
        ValueError: the tensors disagree on the batch size, or a tensor has no dimension.

    Example:
        >>> replicate(torch.tensor([[1], [2]]), 2).flatten().tolist()
        [1, 2, 1, 2]
    """
    replicas = check_positive_int("replicas", replicas)
    sizes = _first_dims(batch)
    if len(set(sizes)) > 1:
        raise ValueError(
            f"cannot replicate a batch whose tensors have different first dimensions {sorted(set(sizes))}; "
            "use batched=False"
        )

    def one(item: Tensor) -> Tensor:
        return item.repeat(replicas, *([1] * (item.dim() - 1)))

    return apply_to_collection(batch, Tensor, one)


def batch_size(batch: Any) -> int:
    """The first dimension of the first tensor found in ``batch``.

    Raises:
        ValueError: ``batch`` holds no tensor, or a 0-dimensional one.

    Example:
        >>> batch_size({"x": torch.zeros(3, 2), "y": torch.zeros(3)})
        3
    """
    sizes = _first_dims(batch)
    if not sizes:
        raise ValueError(
            f"no tensor with a batch dimension in the batch of type {type(batch).__name__}; use batched=False"
        )
    return sizes[0]


def _first_dims(batch: Any) -> list[int]:
    sizes: list[int] = []

    def record(item: Tensor) -> None:
        if item.dim() == 0:
            raise ValueError(
                "cannot replicate a 0-dimensional tensor of the batch along dim 0; use batched=False"
            )
        sizes.append(item.shape[0])

    apply_to_collection(batch, Tensor, record)
    return sizes


def device_of(batch: Any) -> torch.device | None:
    """The device of the first tensor in ``batch``, or None.

    Example:
        >>> device_of((1, torch.zeros(2)))
        device(type='cpu')
    """
    devices: list[torch.device] = []
    apply_to_collection(batch, Tensor, lambda item: devices.append(item.device))
    return devices[0] if devices else None


def default_chunk(n_samples: int, rows: int, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Replicas per batched pass: all of them, unless that exceeds ``max_rows`` rows.

    Example:
        >>> default_chunk(30, 100)
        10
    """
    return max(1, min(n_samples, max_rows // max(1, rows)))


def mc_samples(
    step: Callable[[Any], Tensor],
    batch: Any,
    n_samples: int,
    model: torch.nn.Module,
    batched: bool = True,
    chunk_size: int | None = None,
    masks: ConsistentMasks | None = None,
    first: int = 0,
) -> Iterator[Tensor]:
    """Yield the outputs of ``n_samples`` calls of ``step(batch)``, chunk by chunk.

    Each yielded tensor has shape ``(k, *output_shape)`` with the chunk's ``k`` passes.
    Looped: one call per pass. Batched: ``step`` runs on ``batch`` replicated ``k`` times
    along dim 0 with independent DropConnect masks per replica. The caller sets the modes
    (:func:`~lightning_dropout.mc.mc_dropout`) and the grad mode.

    Args:
        step: maps a batch to a tensor whose dim 0 is the batch.
        batch: a tensor or a (nested) collection of them.
        n_samples: number of stochastic passes.
        model: the module whose DropConnect layers are given per-replica masks.
        batched: replicate and run several passes at once.
        chunk_size: replicas per batched pass; None chooses so that a pass has at most
            1024 rows.
        masks: consistent masks (entered by the caller): pass ``r`` is replica ``r``.
        first: the index of the first pass (of the consistent masks' replicas), so that
            passes drawn in several calls continue one sequence.

    Raises:
        TypeError: ``step`` does not return a tensor.
        ValueError: in batched mode, an output whose dim 0 is not replicas x batch size.

    Example:
        >>> net = torch.nn.Dropout(0.5)
        >>> [chunk.shape for chunk in mc_samples(net, torch.ones(3, 2), 4, net, chunk_size=3)]
        [torch.Size([3, 3, 2]), torch.Size([1, 3, 2])]
    """
    n_samples = check_positive_int("n_samples", n_samples)
    first = check_int("first", first, minimum=0)
    if not batched:
        for replica in range(first, first + n_samples):
            with masks.replicas(replica, 1) if masks is not None else nullcontext():
                out = checked_tensor(step(batch))
            yield out.unsqueeze(0)
        return
    rows = batch_size(batch)
    chunk = (
        default_chunk(n_samples, rows) if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    )
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        with masks.replicas(first + done, k) if masks is not None else independent_replica_masks(model, k):
            out = checked_tensor(step(replicate(batch, k) if k > 1 else batch))
        if out.dim() == 0 or out.shape[0] != k * rows:
            raise ValueError(
                f"a batched pass over {k} replicas of a batch of {rows} returned shape {tuple(out.shape)}, "
                f"not ({k * rows}, ...): the model does not map samples along dim 0 to outputs along "
                "dim 0; use batched=False"
            )
        yield out.reshape(k, rows, *out.shape[1:])
        done += k


def gaussian_step(model: Callable[[Any], Any]) -> Callable[[Any], Tensor]:
    """``model`` with a (mean, log-variance) pair output stacked along a last dimension.

    Example:
        >>> gaussian_step(lambda x: (x, -x))(torch.ones(2)).shape
        torch.Size([2, 2])
    """

    def step(batch: Any) -> Tensor:
        out = model(batch)
        if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out):
            return torch.stack(tuple(out), -1)
        return checked_tensor(out)

    return step


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Within the block torch's CPU generator (and ``device``'s CUDA one) draw from ``seed``;
    their states are restored on exit (``torch.random.fork_rng``).

    Example:
        >>> with seeded(3):
        ...     a = torch.rand(2)
        >>> with seeded(3):
        ...     torch.equal(a, torch.rand(2))
        True
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for generator in default_generators(devices):
            generator.manual_seed(seed)
        yield


def checked_tensor(out: Any) -> Tensor:
    """``out`` if it is a tensor, else a TypeError: a pass must return one.

    Example:
        >>> checked_tensor(torch.zeros(1)).shape
        torch.Size([1])
    """
    if not isinstance(out, Tensor):
        raise TypeError(f"a Monte-Carlo pass must return a tensor, got {type(out).__name__}")
    return out


__all__ = [
    "DEFAULT_MAX_ROWS",
    "batch_size",
    "checked_tensor",
    "default_chunk",
    "device_of",
    "gaussian_step",
    "mc_samples",
    "replicate",
    "seeded",
]
