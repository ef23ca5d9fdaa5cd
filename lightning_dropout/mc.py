"""Monte-Carlo dropout inference and its uncertainty summaries (pure PyTorch).

A network trained with dropout is an ensemble of thinned networks with shared weights;
averaging many stochastic forward passes approximates the Bayesian predictive
distribution (Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016).

:func:`mc_mode` makes every dropout site of a model drop (dropout modules, attention
dropout inside ``scaled_dot_product_attention``, rates read in a forward; see
:mod:`lightning_dropout.sites`) by turning on only the ``training`` flags that gate them, so
BatchNorm keeps its running statistics untouched, and restores every module's mode on
exit. :func:`mc_predict` runs the passes either looped or batched: the input is
replicated replica-major along dimension 0 and run in one forward pass per chunk of
replicas. DropConnect layers draw one weight mask per forward call, which would make every
replica of a batched pass identical; during a batched pass their ``mask_groups`` is set to
the number of replicas in the chunk so that each replica gets its own mask.

For class logits the summaries are computed on the softmax probabilities: ``mean`` is the
predictive distribution, ``entropy`` its entropy (total uncertainty) and
``mutual_information`` the entropy minus the mean entropy of the passes (BALD, the
epistemic part; Houlsby et al. 2011).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dropout._validation import check_bool, check_choice, check_positive_int
from lightning_dropout.layers import DropConnect, DropConnectLayer
from lightning_dropout.sites import DropoutSite, find_sites, select_sites, sites_training

OUTPUT_KINDS = ("logits", "probs", "regression")
DEFAULT_MAX_ROWS = 1024


@dataclass
class MCOutput:
    """The summary of ``n_samples`` stochastic forward passes.

    For ``output="regression"`` the statistics are over the raw outputs; for ``"logits"``
    and ``"probs"`` over the class probabilities (softmax of the logits along the class
    dimension), so ``mean`` is the predictive distribution.

    Attributes:
        mean: mean over the passes, shaped like one output.
        variance: variance over the passes (the 1/n Monte-Carlo estimate), same shape.
        entropy: predictive entropy of ``mean`` in nats, the output's shape without the
            class dimension; None for regression.
        mutual_information: ``entropy`` minus the mean entropy of the passes (BALD), same
            shape; None for regression.
        samples: every pass's output (probabilities for classification), shaped
            ``(n_samples, *output.shape)``, if requested; else None.
        n_samples: the number of passes.

    Example:
        >>> out = MCOutput.from_samples(torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]))
        >>> out.mean
        tensor([[0.5000, 0.5000]])
        >>> round(out.entropy.item(), 4), out.mutual_information.item() > 0
        (0.6931, True)
    """

    mean: Tensor
    variance: Tensor
    entropy: Tensor | None = None
    mutual_information: Tensor | None = None
    samples: Tensor | None = None
    n_samples: int = 0

    @classmethod
    def from_samples(
        cls, samples: Tensor, output: str = "logits", class_dim: int = -1, keep_samples: bool = False
    ) -> MCOutput:
        """Summarise ``samples`` of shape ``(n_samples, *output_shape)``.

        Args:
            samples: the passes' outputs stacked along dimension 0.
            output: ``"logits"``, ``"probs"`` or ``"regression"``.
            class_dim: the class dimension of one output (not counting the sample one).
            keep_samples: keep the (probability) samples in the result.

        Raises:
            ValueError: an unknown ``output`` or a class dimension of size 1.
        """
        return summarize([samples], output, class_dim, keep_samples)

    def log_mean(self) -> Tensor:
        """The MC prediction as one tensor a loss or metric can take like a plain output.

        The log of the predictive distribution for classification (valid logits:
        ``argmax`` and ``cross_entropy`` see the MC prediction), ``mean`` for regression.
        """
        if self.entropy is None:
            return self.mean
        return self.mean.clamp_min(torch.finfo(self.mean.dtype).tiny).log()


@contextmanager
def mc_mode(
    module: nn.Module,
    sites: str | Sequence[str] | None = None,
    found: Mapping[str, DropoutSite] | None = None,
) -> Iterator[nn.Module]:
    """Within the block the dropout sites of ``module`` drop, and nothing else changes mode.

    Every site (see :mod:`lightning_dropout.sites`) drops at its rate: dropout modules,
    attention dropout handed to ``scaled_dot_product_attention`` as
    ``p if self.training else 0``, rates read in a forward, ``nn.LSTM(dropout=)``.
    Only the ``training`` flag of each site's gates is set (the dropout module; the module
    whose code drops), never ``.train()``: BatchNorm, a module wrapped by
    :class:`DropConnect` and everything else keep their mode, so running statistics stay
    untouched. Every module's mode is restored on exit, also after an exception.

    Args:
        module: the model.
        sites: only the sites matching these globs (see :mod:`lightning_dropout.selection`);
            None for all.
        found: the model's sites when already found (saves a search per call).

    Raises:
        ValueError: a pattern in ``sites`` matches no site.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Dropout()).eval()
        >>> with mc_mode(net):
        ...     [m.training for m in net]
        [False, True]
        >>> [m.training for m in net]
        [False, False]
    """
    with sites_training(module, select_sites(module, sites, found)):
        yield module


@contextmanager
def independent_replica_masks(module: nn.Module, replicas: int) -> Iterator[None]:
    """Give each of ``replicas`` inputs stacked replica-major along dim 0 its own weight masks.

    Sets ``mask_groups = replicas`` on every DropConnect layer and wrapper that draws one
    mask per call (``per_sample=True`` layers already draw one per sample) and restores the
    previous values on exit.

    Args:
        module: the model.
        replicas: how many replicas the batch holds.

    Example:
        >>> from lightning_dropout import DropConnectLinear
        >>> layer = DropConnectLinear(3, 2)
        >>> with independent_replica_masks(layer, 4):
        ...     layer.mask_groups
        4
        >>> layer.mask_groups
        1
    """
    replicas = check_positive_int("replicas", replicas)
    layers = [
        m
        for m in module.modules()
        if isinstance(m, DropConnect) or (isinstance(m, DropConnectLayer) and not m.per_sample)
    ]
    previous = [m.mask_groups for m in layers]
    try:
        for m in layers:
            m.mask_groups = replicas
        yield
    finally:
        for m, groups in zip(layers, previous, strict=True):
            m.mask_groups = groups


def replicate(batch: Any, replicas: int) -> Any:
    """Stack ``replicas`` copies of every tensor of ``batch`` along dim 0, replica-major.

    Tensors inside tuples, lists and mappings are replicated; anything else is passed on.
    Copy ``i`` occupies rows ``[i * B, (i + 1) * B)``.

    Args:
        batch: a tensor or a (nested) tuple, list or mapping of them.
        replicas: the number of copies.

    Raises:
        ValueError: the tensors disagree on the batch size, or a tensor has no dimension.

    Example:
        >>> replicate(torch.tensor([[1], [2]]), 2).flatten().tolist()
        [1, 2, 1, 2]
    """
    sizes: set[int] = set()

    def one(item: Any) -> Any:
        if isinstance(item, Tensor):
            if item.dim() == 0:
                raise ValueError(
                    "cannot replicate a 0-dimensional tensor of the batch along dim 0; use batched=False"
                )
            sizes.add(item.shape[0])
            return item.repeat(replicas, *([1] * (item.dim() - 1)))
        if isinstance(item, Mapping):
            return type(item)({k: one(v) for k, v in item.items()})  # type: ignore[call-arg]
        if isinstance(item, tuple) and hasattr(item, "_fields"):
            return type(item)(*(one(v) for v in item))
        if isinstance(item, (tuple, list)):
            return type(item)(one(v) for v in item)
        return item

    result = one(batch)
    if len(sizes) > 1:
        raise ValueError(
            f"cannot replicate a batch whose tensors have different first dimensions {sorted(sizes)}; "
            "use batched=False"
        )
    return result


def batch_size(batch: Any) -> int:
    """The first dimension of the first tensor found in ``batch``.

    Raises:
        ValueError: ``batch`` holds no tensor.
    """
    if isinstance(batch, Tensor) and batch.dim() > 0:
        return batch.shape[0]
    items = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    )
    for item in items:
        try:
            return batch_size(item)
        except ValueError:
            continue
    raise ValueError(
        f"no tensor with a batch dimension in the batch of type {type(batch).__name__}; use batched=False"
    )


def default_chunk(n_samples: int, rows: int, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Replicas per batched pass: all of them, unless that exceeds ``max_rows`` rows."""
    return max(1, min(n_samples, max_rows // max(1, rows)))


def mc_samples(
    step: Callable[[Any], Tensor],
    batch: Any,
    n_samples: int,
    model: nn.Module,
    batched: bool = True,
    chunk_size: int | None = None,
) -> Iterator[Tensor]:
    """Yield the outputs of ``n_samples`` calls of ``step(batch)``, chunk by chunk.

    Each yielded tensor has shape ``(k, *output_shape)`` with the chunk's ``k`` passes.
    Looped: one call per pass. Batched: ``step`` runs on ``batch`` replicated ``k`` times
    along dim 0 with independent DropConnect masks per replica. The caller sets the modes
    (:func:`mc_mode`) and the grad mode.

    Args:
        step: maps a batch to a tensor whose dim 0 is the batch.
        batch: a tensor or a (nested) tuple, list or mapping of them.
        n_samples: number of stochastic passes.
        model: the module whose DropConnect layers are given per-replica masks.
        batched: replicate and run several passes at once.
        chunk_size: replicas per batched pass; None chooses so that a pass has at most
            1024 rows.

    Raises:
        TypeError: ``step`` does not return a tensor.
        ValueError: in batched mode, an output whose dim 0 is not replicas x batch size.
    """
    n_samples = check_positive_int("n_samples", n_samples)
    if not batched:
        for _ in range(n_samples):
            yield _checked_tensor(step(batch)).unsqueeze(0)
        return
    rows = batch_size(batch)
    chunk = (
        default_chunk(n_samples, rows) if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    )
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        with independent_replica_masks(model, k):
            out = _checked_tensor(step(replicate(batch, k) if k > 1 else batch))
        if out.dim() == 0 or out.shape[0] != k * rows:
            raise ValueError(
                f"a batched pass over {k} replicas of a batch of {rows} returned shape {tuple(out.shape)}, "
                f"not ({k * rows}, ...): the model does not map samples along dim 0 to outputs along "
                "dim 0; use batched=False"
            )
        yield out.reshape(k, rows, *out.shape[1:])
        done += k


def mc_predict(
    model: nn.Module,
    x: Any,
    n_samples: int = 30,
    batched: bool = True,
    chunk_size: int | None = None,
    output: str = "logits",
    class_dim: int = -1,
    return_samples: bool = False,
) -> MCOutput:
    """Monte-Carlo dropout prediction: ``n_samples`` stochastic passes of ``model(x)``.

    Runs under ``torch.no_grad`` and :func:`mc_mode` (every dropout site stochastic,
    attention dropout included; BatchNorm and the rest keep their mode; every mode
    restored afterwards). Warns when the passes would all be equal (no site, or p = 0
    everywhere).

    Args:
        model: the model; called as ``model(x)``.
        x: its input: a tensor (or nested tuple, list or mapping of tensors) with the
            batch along dimension 0.
        n_samples: number of stochastic passes.
        batched: replicate the input and run the passes in few forward calls (chunks of
            ``chunk_size`` replicas) rather than one call per pass. Needs a model that maps
            samples along dim 0 independently (no seq-first RNN over dim 0).
        chunk_size: replicas per batched call, to bound memory; None keeps a call at
            1024 rows or fewer.
        output: ``"logits"`` (softmax along ``class_dim`` first), ``"probs"`` or
            ``"regression"``.
        class_dim: the class dimension of the output.
        return_samples: keep every pass's output in :attr:`MCOutput.samples`.

    Raises:
        TypeError: a wrongly typed argument, or a model output that is not a tensor.
        ValueError: ``n_samples`` or ``chunk_size`` below 1, an unknown ``output``, a class
            dimension of size 1, or a batched output that is not replicas x batch along dim 0.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).eval()
        >>> out = mc_predict(net, torch.randn(5, 4), n_samples=8)
        >>> out.mean.shape, out.entropy.shape, net.training
        (torch.Size([5, 3]), torch.Size([5]), False)
    """
    output = check_choice("output", output, OUTPUT_KINDS)
    return_samples = check_bool("return_samples", return_samples)
    found = find_sites(model)
    problem = deterministic_reason(found)
    if problem:
        warnings.warn(f"{type(model).__name__} {problem}: every Monte-Carlo pass is identical", stacklevel=2)
    with torch.no_grad(), mc_mode(model, found=found):
        chunks = mc_samples(model, x, n_samples, model, check_bool("batched", batched), chunk_size)
        return summarize(chunks, output, class_dim, return_samples)


def deterministic_reason(sites: Mapping[str, DropoutSite]) -> str | None:
    """Why Monte-Carlo passes over a model with these sites would all be equal, or None.

    Example:
        >>> deterministic_reason({})
        'has no dropout site'
    """
    if not sites:
        return "has no dropout site"
    if all(site.p == 0.0 for site in sites.values()):
        return f"has p = 0 at every dropout site ({', '.join(sites)})"
    return None


def summarize(
    chunks: Iterable[Tensor], output: str = "logits", class_dim: int = -1, keep_samples: bool = False
) -> MCOutput:
    """Summarise chunks of samples, each shaped ``(k, *output_shape)``, into an :class:`MCOutput`.

    Streaming: only the running statistics (and the samples, if kept) are held.

    Args:
        chunks: the passes' outputs, chunk by chunk (as :func:`mc_samples` yields them).
        output: ``"logits"``, ``"probs"`` or ``"regression"``.
        class_dim: the class dimension of one output.
        keep_samples: keep the (probability) samples in the result.

    Raises:
        TypeError: ``class_dim`` is not an int.
        ValueError: an unknown ``output``, a class dimension of size 1, or no samples.

    Example:
        >>> out = summarize([torch.ones(2, 3, 1), torch.zeros(2, 3, 1)], output="regression")
        >>> out.mean.flatten().tolist(), out.variance.flatten().tolist(), out.n_samples
        ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 4)
    """
    summary = _Summary(check_choice("output", output, OUTPUT_KINDS), class_dim, keep_samples)
    for samples in chunks:
        summary.update(samples)
    return summary.result()


class _Summary:
    """Streaming mean, variance and entropies over chunks of samples (Chan et al.'s merge),
    so that only the requested samples are ever kept."""

    def __init__(self, output: str, class_dim: int, keep_samples: bool) -> None:
        if isinstance(class_dim, bool) or not isinstance(class_dim, int):
            raise TypeError(f"class_dim must be an int, got {type(class_dim).__name__} {class_dim!r}")
        self.output = output
        self.class_dim = class_dim
        self.keep_samples = keep_samples
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.entropy_sum: Tensor | None = None
        self.kept: list[Tensor] = []

    def update(self, samples: Tensor) -> None:
        if self.output != "regression":
            dim = self.class_dim if self.class_dim < 0 else self.class_dim + 1
            if samples.shape[dim] == 1:
                raise ValueError(
                    f"class_dim {self.class_dim} has size 1: a single output cannot be class "
                    "probabilities; use output='regression'"
                )
            if self.output == "logits":
                samples = samples.softmax(dim)
            entropies = _entropy(samples, dim).sum(0)
            self.entropy_sum = entropies if self.entropy_sum is None else self.entropy_sum + entropies
        k = samples.shape[0]
        chunk_mean = samples.mean(0)
        chunk_m2 = ((samples - chunk_mean) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = chunk_mean, chunk_m2
        else:
            total = self.count + k
            delta = chunk_mean - self.mean
            self.mean = self.mean + delta * (k / total)
            self.m2 = self.m2 + chunk_m2 + delta**2 * (self.count * k / total)
        self.count += k
        if self.keep_samples:
            self.kept.append(samples)

    def result(self) -> MCOutput:
        if self.mean is None or self.m2 is None:
            raise ValueError("no samples to summarise")
        out = MCOutput(self.mean, self.m2 / self.count, n_samples=self.count)
        if self.entropy_sum is not None:
            dim = self.class_dim
            out.entropy = _entropy(self.mean, dim)
            out.mutual_information = (out.entropy - self.entropy_sum / self.count).clamp_min(0.0)
        if self.keep_samples:
            out.samples = torch.cat(self.kept)
        return out


def _entropy(probs: Tensor, dim: int) -> Tensor:
    # xlogy gives 0 * log 0 = 0.
    return -torch.special.xlogy(probs, probs).sum(dim)


def _checked_tensor(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"a Monte-Carlo pass must return a tensor, got {type(out).__name__}")
    return out


__all__ = [
    "MCOutput",
    "deterministic_reason",
    "independent_replica_masks",
    "mc_mode",
    "mc_predict",
    "mc_samples",
    "replicate",
    "summarize",
]
