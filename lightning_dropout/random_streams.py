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

Under tensor parallelism the stream's rank is the *data-parallel* coordinate
(:func:`mesh_ranks`): the ranks of one tensor-parallel group draw the same masks, which is
right for an activation they all hold whole (a replicated activation; different masks would
make the replicas diverge). An activation sharded across the group needs a different mask
on each shard: :class:`ShardedSites` runs the forward of the modules named by patterns in a
stream keyed by the tensor-parallel rank as well.

CPU's Mersenne Twister keeps the low 32 bits of a seed, so there are 2**32 distinct CPU
streams; CUDA's Philox keeps all 64. Only the ``cpu`` and ``cuda`` generators are handled.
This module is pure PyTorch; :class:`lightning_dropout.callbacks.PerRankDropout` wires it
into Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_dropout._validation import check_int
from lightning_dropout.selection import check_patterns, matches_name, select

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["RankStreams", "ShardedSites", "default_generators", "mesh_ranks", "mix_seed", "stream_seed"]

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
    return mix_seed(seed, rank, step)


def mix_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed derived from ``seed`` and ``keys`` (SplitMix64 chained over them):
    nearby inputs give unrelated seeds.

    Example:
        >>> mix_seed(0, 1) != mix_seed(0, 2) and mix_seed(0, 1) == mix_seed(0, 1)
        True
    """
    mixed = _splitmix64(seed & _MASK64)
    for key in keys:
        mixed = _splitmix64(mixed ^ key)
    # torch.Generator.manual_seed accepts [-2**63, 2**64); a non-negative int64 is
    # portable across its CPU and CUDA implementations.
    return mixed >> 1


def default_generators(devices: Sequence[torch.device | str]) -> list[torch.Generator]:
    """torch's global generators: the CPU one and those of ``devices`` (once each)."""
    generators = [_default_generator(torch.device(d)) for d in ("cpu", *devices)]
    # "cuda" and "cuda:0" may name one generator; saving it twice would be harmless but
    # restoring must happen once per generator.
    return list({id(g): g for g in generators}.values())


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
        rank: this process's global rank; under tensor parallelism its data-parallel rank
            (:func:`mesh_ranks`), so that a tensor-parallel group shares its masks.
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
        self.seed = check_int("seed", seed)
        self.rank = check_int("rank", rank, minimum=0)
        self.step = check_int("step", step, minimum=0)
        self._generators = default_generators(devices)
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


def mesh_ranks(mesh: DeviceMesh, tensor_parallel: str | Sequence[str]) -> tuple[int, int]:
    """This process's (data-parallel rank, tensor-parallel rank) in a named DeviceMesh.

    The data-parallel rank numbers the process's coordinates on every dimension but the
    tensor-parallel ones (row-major), the tensor-parallel rank those on the tensor-parallel
    dimensions. Pass the first as :class:`RankStreams`' ``rank`` (one stream per
    tensor-parallel group) and the second as :class:`ShardedSites`' ``rank``.

    Args:
        mesh: a DeviceMesh with ``mesh_dim_names`` that holds this process.
        tensor_parallel: the name(s) of the tensor-parallel dimension(s).

    Raises:
        ValueError: the mesh has no dimension names, lacks a name in ``tensor_parallel``,
            or does not hold this process.

    Example:
        >>> from types import SimpleNamespace
        >>> mesh = SimpleNamespace(mesh_dim_names=("dp", "tp"), shape=(2, 4), get_coordinate=lambda: [1, 3])
        >>> mesh_ranks(mesh, "tp")  # a real DeviceMesh reads the same way
        (1, 3)
    """
    names = mesh.mesh_dim_names
    wanted = (tensor_parallel,) if isinstance(tensor_parallel, str) else tuple(tensor_parallel)
    if names is None or not set(wanted) <= set(names):
        raise ValueError(f"tensor_parallel: the mesh's dimensions are {names!r}, not all of {wanted!r}")
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("mesh does not hold this process: it has no coordinate in it")
    data_rank = tensor_rank = 0
    for name, size, index in zip(names, mesh.shape, coordinate, strict=True):
        if name in wanted:
            tensor_rank = tensor_rank * size + index
        else:
            data_rank = data_rank * size + index
    return data_rank, tensor_rank


class ShardedSites:
    """Masks that differ across tensor-parallel ranks for sites whose activations are sharded.

    Under tensor parallelism every rank of a tensor-parallel group draws from one stream
    (:class:`RankStreams` keyed by the data-parallel rank), so a dropout site whose
    activation is split among the group would apply the same mask to every shard. This
    hooks the modules whose qualified names match ``patterns`` (the topmost matches: a
    pattern naming a module covers everything below it): when a hooked module runs with a
    training submodule, one number is drawn from torch's global CPU generator (the same
    number on every rank of the group), the global generators are reseeded from it and
    ``rank`` for the module's forward, and restored after it. So:

    * the ranks of a tensor-parallel group draw different masks inside the hooked modules
      and identical ones elsewhere; data-parallel ranks differ in both, through the number
      drawn from their own streams;
    * the masks depend only on the streams' state: ``torch.utils.checkpoint`` recomputes
      them (it replays the global state it saw when its region began), a seed reproduces
      them, and nothing new needs saving for a resume;
    * modules in evaluation mode (a forward with no training submodule) draw nothing.

    Mark the dropout module itself (``"layers.*.attention.attn_drop"``) or, for a rate read
    in forward (``scaled_dot_product_attention``'s ``dropout_p``, ``F.dropout``), the module
    whose forward reads it: every draw in a hooked forward is per tensor-parallel rank.

    Args:
        module: the model (qualified names as in ``module.named_modules()``).
        patterns: globs on qualified module names (see :mod:`lightning_dropout.selection`).
        rank: this process's tensor-parallel rank (:func:`mesh_ranks`).
        devices: accelerator devices whose default generators are reseeded too (``cuda``).

    Raises:
        TypeError: ``patterns`` is not a sequence of strings, or ``rank`` not an int.
        ValueError: a pattern matches no module, or ``rank`` is negative.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 4), nn.Dropout(0.5))
        >>> masks = []
        >>> for rank in (0, 1):
        ...     _ = torch.manual_seed(0)
        ...     with ShardedSites(net, ["1"], rank=rank):
        ...         masks.append([net[1](torch.ones(64)) != 0, net[3](torch.ones(64)) != 0])
        >>> torch.equal(masks[0][0], masks[1][0]), torch.equal(masks[0][1], masks[1][1])
        (False, True)
    """

    def __init__(
        self,
        module: nn.Module,
        patterns: Sequence[str],
        rank: int,
        devices: Sequence[torch.device | str] = (),
    ) -> None:
        patterns = check_patterns("patterns", patterns) or []
        self.rank = check_int("rank", rank, minimum=0)
        select((name for name, _ in module.named_modules() if name), patterns, "module")
        self._generators = default_generators(devices)
        self._saved: list[list[torch.Tensor] | None] = []
        self.modules: dict[str, nn.Module] = {}
        for name, submodule in module.named_modules():
            selected = name and any(matches_name(name, pattern) for pattern in patterns)
            # Only the topmost matches: what runs below a hooked module already draws from
            # its stream. (Nested hooks would be correct too, each drawing its number from
            # the stream around it, but would cost a reseed each.)
            if selected and not any(matches_name(name, above) for above in self.modules):
                self.modules[name] = submodule
        self._handles = [
            handle
            for submodule in self.modules.values()
            for handle in (
                submodule.register_forward_pre_hook(self._enter),
                submodule.register_forward_hook(self._exit, always_call=True),
            )
        ]

    def _enter(self, module: nn.Module, args: Any) -> None:
        if not any(m.training for m in module.modules()):
            self._saved.append(None)
            return
        # Drawn from the group's common stream, so identical across the group and
        # replayed by checkpointing; the rank then makes the shards' seeds differ.
        token = int(torch.randint(1 << 62, (), dtype=torch.int64))
        self._saved.append([generator.get_state() for generator in self._generators])
        seed = mix_seed(token, self.rank)
        for generator in self._generators:
            generator.manual_seed(seed)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        # Empty only when an earlier pre-hook raised before ours ran (always_call still
        # calls this one).
        saved = self._saved.pop() if self._saved else None
        if saved is not None:
            for generator, state in zip(self._generators, saved, strict=True):
                generator.set_state(state)

    def remove(self) -> None:
        """Remove the hooks (the modules then draw from the global generators as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ShardedSites:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.remove()
