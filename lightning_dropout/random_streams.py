"""Per-rank random streams for dropout masks, swapped into torch's global generators.

With ``seed_everything`` every DDP rank seeds torch identically, so every rank draws the
same dropout masks for its slice of the batch: the ranks' gradients then come from one
thinned network instead of several, and the effective ensemble shrinks by the world size.
:class:`RankStreams` gives each (global) rank its own stream without touching model
initialisation or data order:

* the masks of training step ``k`` on rank ``r`` are drawn from torch's global generators
  reseeded with :func:`stream_seed` ``(seed, r, k)``, so they depend only on the run's seed,
  the rank and the step: the same seed and world size reproduce them, and a resume needs
  only ``(seed, step)`` (see :meth:`RankStreams.state_dict`);
* the global generators' own states are saved when a step's scope opens and restored when
  it closes, so whatever runs outside training steps (weight initialisation, samplers,
  dataloader worker seeds, validation) sees exactly the numbers it would have seen had the
  steps drawn nothing;
* because the swap happens in torch's global generators, every layer that draws from them
  is covered: this package's layers and kernels, torch's own ``nn.Dropout`` family and
  ``F.dropout``, DropConnect's per-group seeds. ``torch.utils.checkpoint`` stays consistent:
  it records the global state it sees in the forward pass (the stream's) and replays it
  when it recomputes during backward, inside the same scope.

CPU's Mersenne Twister keeps the low 32 bits of a seed, so there are 2**32 distinct CPU
streams; CUDA's Philox keeps all 64. Only the ``cpu`` and ``cuda`` generators are handled.
This module is pure PyTorch; :class:`lightning_dropout.callbacks.PerRankDropout` wires it
into Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["RankStreams", "stream_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    # Steele, Lea and Flood's SplitMix64 finaliser: a bijection of 64-bit integers whose
    # output bits each depend on every input bit, so nearby (seed, rank, step) triples
    # give unrelated seeds.
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(seed: int, rank: int, step: int) -> int:
    """The generator seed of training step ``step`` on global rank ``rank``.

    Args:
        seed: the run's seed (any int; only its low 64 bits matter).
        rank: the global rank, >= 0.
        step: the training-step counter, >= 0.

    Raises:
        ValueError: ``rank`` or ``step`` is negative.

    Example:
        >>> stream_seed(0, 0, 0) == stream_seed(0, 0, 0) != stream_seed(0, 1, 0)
        True
        >>> 0 <= stream_seed(42, 3, 7) < 2**63
        True
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ rank)
    mixed = _splitmix64(mixed ^ step)
    # torch.Generator.manual_seed accepts [-2**63, 2**64); a non-negative int64 is
    # portable across its CPU and CUDA implementations.
    return mixed >> 1


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    raise ValueError(f"devices: only 'cpu' and 'cuda' generators are supported, got {str(device)!r}")


class RankStreams:
    """One random stream per global rank, swapped into torch's global generators per step.

    :meth:`activate` saves the global generators' states and reseeds them with
    :func:`stream_seed` ``(seed, rank, step)``, then advances ``step``; :meth:`deactivate`
    restores the saved states. Between the two, every draw from torch's global generators
    (dropout masks, torch's own dropout, DropConnect seeds) comes from this rank's stream.
    The CPU generator is always covered; pass the CUDA devices the model runs on as
    ``devices``.

    Args:
        seed: the run's seed, identical on every rank (e.g. ``torch.initial_seed()``).
        rank: this process's global rank.
        devices: accelerator devices whose default generators are covered too (``cuda``).
        step: the index of the next step (a resumed run passes the steps already done).

    Raises:
        TypeError: ``seed``, ``rank`` or ``step`` is not an int.
        ValueError: ``rank`` or ``step`` is negative, or a device is neither cpu nor cuda.

    Example:
        >>> streams = RankStreams(seed=0, rank=1)
        >>> _ = torch.manual_seed(123); before = torch.get_rng_state()
        >>> with streams.step_scope():
        ...     mask = torch.rand(4) < 0.5
        >>> torch.equal(torch.get_rng_state(), before), streams.step
        (True, 1)
    """

    def __init__(
        self,
        seed: int,
        rank: int,
        devices: Sequence[torch.device | str] = (),
        step: int = 0,
    ) -> None:
        for name, value in (("seed", seed), ("rank", rank), ("step", step)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        stream_seed(seed, rank, step)  # validates rank and step
        self.seed = seed
        self.rank = rank
        self.step = step
        generators = [_default_generator(torch.device(d)) for d in ("cpu", *devices)]
        # "cuda" and "cuda:0" may name one generator; saving it twice would be harmless but
        # restoring must happen once per generator.
        self._generators = list({id(g): g for g in generators}.values())
        self._saved_states: list[torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        """Whether a step's scope is open (the global generators hold this stream)."""
        return self._saved_states is not None

    def activate(self) -> None:
        """Open a step's scope: save the global states, reseed them for this step.

        Raises:
            RuntimeError: a scope is already open.
        """
        if self._saved_states is not None:
            raise RuntimeError("RankStreams.activate called twice without deactivate")
        self._saved_states = [generator.get_state() for generator in self._generators]
        seed = stream_seed(self.seed, self.rank, self.step)
        for generator in self._generators:
            generator.manual_seed(seed)
        self.step += 1

    def deactivate(self) -> None:
        """Close the step's scope: restore the global states saved by :meth:`activate`.

        Does nothing when no scope is open, so every exit path may call it.
        """
        if self._saved_states is None:
            return
        for generator, state in zip(self._generators, self._saved_states, strict=True):
            generator.set_state(state)
        self._saved_states = None

    @contextmanager
    def step_scope(self) -> Iterator[None]:
        """Context manager form of :meth:`activate` / :meth:`deactivate` for one step."""
        self.activate()
        try:
            yield
        finally:
            self.deactivate()

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "step"}``: all a resume needs, identical on every rank.

        The rank is left out on purpose: Lightning writes rank 0's checkpoint and every
        rank loads it, each keeping its own rank.
        """
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the streams saved by :meth:`state_dict` (missing keys are kept)."""
        self.seed = int(state.get("seed", self.seed))
        self.step = int(state.get("step", self.step))
