"""Monte-Carlo dropout inference and its uncertainty summaries (pure PyTorch).

A network trained with dropout is an ensemble of thinned networks with shared weights;
averaging many stochastic forward passes approximates the Bayesian predictive
distribution (Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016).

:func:`mc_dropout` makes every dropout site of a model drop (dropout modules, attention
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
epistemic part; Houlsby et al. 2011). For a model that predicts a Gaussian (a mean and a
log-variance, ``output="gaussian"``) the predictive variance splits into the mean of the
predicted variances (aleatoric) and the variance of the predicted means (epistemic;
Kendall & Gal, NeurIPS 2017). ``standard_error`` is the Monte-Carlo standard error of
``mean``: whether ``n_samples`` suffices.

Options of :func:`mc_predict`: ``sites`` restricts the sampling to some sites (globs, as
everywhere in the package); ``consistent=True`` gives every replica one fixed sub-network
for all inputs (:mod:`lightning_dropout.consistent_masks`); ``seed`` makes a run
reproducible without touching torch's global random stream. When the model is an
``nn.Sequential`` whose first children hold no dropping site, those children run once per
batch, not once per pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dropout._validation import check_bool, check_choice, check_positive_int
from lightning_dropout.consistent_masks import ConsistentMasks
from lightning_dropout.layers import WeightMaskLayer
from lightning_dropout.random_streams import default_generators
from lightning_dropout.sites import DropoutSite, find_sites, select_sites, sites_training

OUTPUT_KINDS = ("logits", "probs", "regression", "gaussian")
DEFAULT_MAX_ROWS = 1024


@dataclass
class MCOutput:
    """The summary of ``n_samples`` stochastic forward passes.

    For ``output="regression"`` the statistics are over the raw outputs; for ``"logits"``
    and ``"probs"`` over the class probabilities (softmax of the logits along the class
    dimension), so ``mean`` is the predictive distribution. For ``"gaussian"`` each pass
    predicts a mean and a log-variance (a last dimension of size 2); the statistics are
    over the predicted means and variances, shaped like one output without that last
    dimension.

    Attributes:
        mean: mean over the passes, shaped like one output.
        variance: variance over the passes (the 1/n Monte-Carlo estimate), same shape; for
            ``"gaussian"`` the predictive variance, ``aleatoric + epistemic``.
        entropy: predictive entropy of ``mean`` in nats, the output's shape without the
            class dimension; None for regression.
        mutual_information: ``entropy`` minus the mean entropy of the passes (BALD), same
            shape; None for regression.
        samples: every pass's output (probabilities for classification; the raw mean and
            log-variance for ``"gaussian"``), shaped ``(n_samples, *output.shape)``, if
            requested; else None.
        n_samples: the number of passes.
        aleatoric: the part of the uncertainty the passes agree on. ``"gaussian"``: the
            mean of the predicted variances; classification: the mean entropy of the passes
            (so ``entropy = aleatoric + epistemic``); None for ``"regression"``.
        epistemic: the part the passes disagree on. ``"gaussian"``: the variance of the
            predicted means; classification: ``mutual_information``; ``"regression"``:
            ``variance``.
        standard_error: the Monte-Carlo standard error of ``mean``,
            ``sqrt(s^2 / n_samples)`` with ``s^2`` the unbiased variance of the passes
            (of the predicted means for ``"gaussian"``), shaped like ``mean``; infinite for
            a single pass. Small against the differences that matter: enough passes.

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
    aleatoric: Tensor | None = None
    epistemic: Tensor | None = None
    standard_error: Tensor | None = None

    @classmethod
    def from_samples(
        cls, samples: Tensor, output: str = "logits", class_dim: int = -1, return_samples: bool = False
    ) -> MCOutput:
        """Summarise ``samples`` of shape ``(n_samples, *output_shape)``.

        Args:
            samples: the passes' outputs stacked along dimension 0.
            output: ``"logits"``, ``"probs"``, ``"regression"`` or ``"gaussian"``.
            class_dim: the class dimension of one output (not counting the sample one).
            return_samples: keep the (probability) samples in the result.

        Raises:
            ValueError: an unknown ``output``, a class dimension of size 1, or a
                ``"gaussian"`` output whose last dimension is not 2.
        """
        return summarize([samples], output, class_dim, return_samples)

    def log_mean(self) -> Tensor:
        """The MC prediction as one tensor a loss or metric can take like a plain output.

        The log of the predictive distribution for classification (valid logits:
        ``argmax`` and ``cross_entropy`` see the MC prediction); for ``"gaussian"`` the
        predictive mean and the log of the predictive variance stacked along a last
        dimension (the model's own output format); ``mean`` for regression.
        """
        if self.entropy is not None:
            return self.mean.clamp_min(torch.finfo(self.mean.dtype).tiny).log()
        if self.aleatoric is not None:
            return torch.stack([self.mean, self.variance.log()], -1)
        return self.mean


@contextmanager
def mc_dropout(
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
        >>> with mc_dropout(net):
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

    Every layer that draws one mask per call for its whole batch (a
    :class:`~lightning_dropout.layers.WeightMaskLayer`: the DropConnect layers and wrapper,
    EmbeddingDropout) splits its batch into ``replicas`` groups with masks of their own
    within the block; ``per_sample=True`` DropConnect layers already draw one per sample.

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
    with ExitStack() as stack:
        for m in module.modules():
            if isinstance(m, WeightMaskLayer):
                stack.enter_context(m.independent_groups(replicas))
        yield


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
    masks: ConsistentMasks | None = None,
) -> Iterator[Tensor]:
    """Yield the outputs of ``n_samples`` calls of ``step(batch)``, chunk by chunk.

    Each yielded tensor has shape ``(k, *output_shape)`` with the chunk's ``k`` passes.
    Looped: one call per pass. Batched: ``step`` runs on ``batch`` replicated ``k`` times
    along dim 0 with independent DropConnect masks per replica. The caller sets the modes
    (:func:`mc_dropout`) and the grad mode.

    Args:
        step: maps a batch to a tensor whose dim 0 is the batch.
        batch: a tensor or a (nested) tuple, list or mapping of them.
        n_samples: number of stochastic passes.
        model: the module whose DropConnect layers are given per-replica masks.
        batched: replicate and run several passes at once.
        chunk_size: replicas per batched pass; None chooses so that a pass has at most
            1024 rows.
        masks: consistent masks (entered by the caller): pass ``r`` is replica ``r``.

    Raises:
        TypeError: ``step`` does not return a tensor.
        ValueError: in batched mode, an output whose dim 0 is not replicas x batch size.
    """
    n_samples = check_positive_int("n_samples", n_samples)
    if not batched:
        for replica in range(n_samples):
            with masks.replicas(replica, 1) if masks is not None else nullcontext():
                out = _checked_tensor(step(batch))
            yield out.unsqueeze(0)
        return
    rows = batch_size(batch)
    chunk = (
        default_chunk(n_samples, rows) if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    )
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        with masks.replicas(done, k) if masks is not None else independent_replica_masks(model, k):
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
    consistent: bool = False,
    seed: int | None = None,
    sites: str | Sequence[str] | None = None,
) -> MCOutput:
    """Monte-Carlo dropout prediction: ``n_samples`` stochastic passes of ``model(x)``.

    Runs under ``torch.no_grad`` and :func:`mc_dropout` (every dropout site stochastic,
    attention dropout included; BatchNorm and the rest keep their mode; every mode
    restored afterwards). Warns when the passes would all be equal (no site, or p = 0
    everywhere).

    When ``model`` is an ``nn.Sequential`` whose first children hold no site that drops
    (``sites`` restricted to a head, say), those children run once on ``x`` and only the
    rest runs once per pass: the same samples, for a fraction of the work.

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
        output: ``"logits"`` (softmax along ``class_dim`` first), ``"probs"``,
            ``"regression"``, or ``"gaussian"`` for a model returning a mean and a
            log-variance (a last dimension of size 2, or a pair of tensors).
        class_dim: the class dimension of the output.
        return_samples: keep every pass's output in :attr:`MCOutput.samples`.
        consistent: pass ``r`` applies the same masks to every input (one fixed
            sub-network per pass, derived from ``(seed, r)``), in batched and looped mode
            alike; see :mod:`lightning_dropout.consistent_masks` (sites that cannot be are
            named in a warning).
        seed: the passes' seed: the same seed gives the same samples, and torch's global
            random stream is left untouched. None draws from torch's global generator.
        sites: only the sites matching these globs drop (see
            :mod:`lightning_dropout.selection`); None for all.

    Raises:
        TypeError: a wrongly typed argument, or a model output that is not a tensor.
        ValueError: ``n_samples`` or ``chunk_size`` below 1, an unknown ``output``, a class
            dimension of size 1, a batched output that is not replicas x batch along dim 0,
            or a pattern in ``sites`` that matches no site.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).eval()
        >>> out = mc_predict(net, torch.randn(5, 4), n_samples=8)
        >>> out.mean.shape, out.entropy.shape, net.training
        (torch.Size([5, 3]), torch.Size([5]), False)
        >>> a, b = (mc_predict(net, torch.ones(2, 4), 4, consistent=True, seed=1) for _ in range(2))
        >>> torch.equal(a.mean, b.mean)
        True
    """
    output = check_choice("output", output, OUTPUT_KINDS)
    return_samples = check_bool("return_samples", return_samples)
    consistent = check_bool("consistent", consistent)
    batched = check_bool("batched", batched)
    seed = _check_seed(seed)
    found = find_sites(model)
    chosen = select_sites(model, sites, found)
    problem = deterministic_reason(chosen)
    if problem:
        warnings.warn(f"{type(model).__name__} {problem}: every Monte-Carlo pass is identical", stacklevel=2)
    with torch.no_grad(), sites_training(model, chosen):
        step: Callable[[Any], Any] = model
        batch = x
        prefix = deterministic_prefix(model, found)
        if prefix is not None:
            head, tail = prefix
            step, batch = tail, head(batch)
        if output == "gaussian":
            step = gaussian_step(step)
        if seed is None and consistent:
            seed = int(torch.randint(0, 2**62, ()).item())
        with seeded(seed, _device_of(x)) if seed is not None else nullcontext():
            masks = ConsistentMasks(model, chosen, seed) if consistent and seed is not None else None
            with masks if masks is not None else nullcontext():
                if masks is not None and masks.inconsistent:
                    warnings.warn(inconsistent_message(masks.inconsistent), stacklevel=2)
                chunks = mc_samples(step, batch, n_samples, model, batched, chunk_size, masks)
                result = summarize(chunks, output, class_dim, return_samples)
            if masks is not None and masks.stray_draws:
                warnings.warn(STRAY_DRAWS_MESSAGE, stacklevel=2)
    return result


STRAY_DRAWS_MESSAGE = (
    "consistent masks: the passes drew random numbers outside the consistent masks (dropout "
    "the package does not know about, or other random code in the forward), so those draws "
    "differ between inputs"
)


def inconsistent_message(reasons: Mapping[str, str]) -> str:
    """The warning naming the sites that cannot be made consistent."""
    listed = "; ".join(f"{name} ({reason})" for name, reason in reasons.items())
    return f"consistent masks: these sites draw independent masks for every input: {listed}"


def deterministic_prefix(
    model: nn.Module, sites: Mapping[str, DropoutSite]
) -> tuple[nn.Module, nn.Module] | None:
    """``(head, tail)`` of an ``nn.Sequential`` whose first children hold no dropping site.

    ``head`` holds the children before the first one with a site that drops now (every gate
    in training mode); ``tail`` the rest. None when ``model`` is not a plain
    ``nn.Sequential``, when its first child already drops, or when nothing drops.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Dropout())
        >>> head, tail = deterministic_prefix(net, find_sites(net))
        >>> len(head), len(tail)
        (2, 1)
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return None
    children = list(model.children())
    names = [name for name, _ in model.named_children()]
    first = min(
        (names.index(name.split(".")[0]) for name, site in sites.items() if site.training and name),
        default=None,
    )
    if not first:
        return None
    return nn.Sequential(*children[:first]), nn.Sequential(*children[first:])


def gaussian_step(model: Callable[[Any], Any]) -> Callable[[Any], Tensor]:
    """``model`` with a (mean, log-variance) pair output stacked along a last dimension."""

    def step(batch: Any) -> Tensor:
        out = model(batch)
        if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out):
            return torch.stack(tuple(out), -1)
        return _checked_tensor(out)

    return step


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Within the block torch's CPU generator (and ``device``'s CUDA one) draw from ``seed``;
    their states are restored on exit.

    Example:
        >>> with seeded(3):
        ...     a = torch.rand(2)
        >>> with seeded(3):
        ...     torch.equal(a, torch.rand(2))
        True
    """
    generators = default_generators([device] if device is not None and device.type == "cuda" else [])
    states = [generator.get_state() for generator in generators]
    try:
        for generator in generators:
            generator.manual_seed(seed)
        yield
    finally:
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


def _device_of(batch: Any) -> torch.device | None:
    if isinstance(batch, Tensor):
        return batch.device
    items = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    )
    for item in items:
        device = _device_of(item)
        if device is not None:
            return device
    return None


def _check_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    return seed


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
    chunks: Iterable[Tensor], output: str = "logits", class_dim: int = -1, return_samples: bool = False
) -> MCOutput:
    """Summarise chunks of samples, each shaped ``(k, *output_shape)``, into an :class:`MCOutput`.

    Streaming: only the running statistics (and the samples, if kept) are held.

    Args:
        chunks: the passes' outputs, chunk by chunk (as :func:`mc_samples` yields them).
        output: ``"logits"``, ``"probs"``, ``"regression"`` or ``"gaussian"``.
        class_dim: the class dimension of one output.
        return_samples: keep the (probability) samples in the result.

    Raises:
        TypeError: ``class_dim`` is not an int.
        ValueError: an unknown ``output``, a class dimension of size 1, a ``"gaussian"``
            output whose last dimension is not 2, or no samples.

    Example:
        >>> out = summarize([torch.ones(2, 3, 1), torch.zeros(2, 3, 1)], output="regression")
        >>> out.mean.flatten().tolist(), out.variance.flatten().tolist(), out.n_samples
        ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 4)
        >>> means_and_log_variances = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])
        >>> g = summarize([means_and_log_variances], output="gaussian")
        >>> g.mean.item(), g.aleatoric.item(), g.epistemic.item(), g.variance.item()
        (2.0, 1.0, 1.0, 2.0)
    """
    summary = _Summary(check_choice("output", output, OUTPUT_KINDS), class_dim, return_samples)
    for samples in chunks:
        summary.update(samples)
    return summary.result()


class _Summary:
    """Streaming mean, variance and entropies over chunks of samples (Chan et al.'s merge),
    so that only the requested samples are ever kept."""

    def __init__(self, output: str, class_dim: int, return_samples: bool) -> None:
        if isinstance(class_dim, bool) or not isinstance(class_dim, int):
            raise TypeError(f"class_dim must be an int, got {type(class_dim).__name__} {class_dim!r}")
        self.output = output
        self.class_dim = class_dim
        self.return_samples = return_samples
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.entropy_sum: Tensor | None = None
        self.variance_sum: Tensor | None = None
        self.kept: list[Tensor] = []

    def update(self, samples: Tensor) -> None:
        if self.return_samples and self.output == "gaussian":
            self.kept.append(samples)
        if self.output == "gaussian":
            if samples.dim() < 2 or samples.shape[-1] != 2:
                raise ValueError(
                    "output='gaussian' needs a mean and a log-variance per output (a last dimension "
                    f"of size 2, or a pair of tensors), got passes of shape {tuple(samples.shape[1:])}"
                )
            variances = samples[..., 1].exp().sum(0)
            self.variance_sum = variances if self.variance_sum is None else self.variance_sum + variances
            samples = samples[..., 0]
        elif self.output != "regression":
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
        if self.return_samples and self.output != "gaussian":
            self.kept.append(samples)

    def result(self) -> MCOutput:
        if self.mean is None or self.m2 is None:
            raise ValueError("no samples to summarise")
        spread = self.m2 / self.count
        if self.count > 1:
            standard_error = (self.m2 / (self.count * (self.count - 1))).sqrt()
        else:
            standard_error = torch.full_like(self.mean, math.inf)
        out = MCOutput(self.mean, spread, n_samples=self.count, standard_error=standard_error)
        if self.entropy_sum is not None:
            out.entropy = _entropy(self.mean, self.class_dim)
            out.aleatoric = self.entropy_sum / self.count
            out.mutual_information = (out.entropy - out.aleatoric).clamp_min(0.0)
            out.epistemic = out.mutual_information
        elif self.variance_sum is not None:
            out.aleatoric = self.variance_sum / self.count
            out.epistemic = spread
            out.variance = out.aleatoric + spread
        else:
            out.epistemic = spread
        if self.return_samples:
            out.samples = torch.cat(self.kept)
        return out


def _entropy(probs: Tensor, dim: int) -> Tensor:
    # xlogy gives 0 * log 0 = 0.
    return -torch.special.xlogy(probs, probs).sum(dim)


def _checked_tensor(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"a Monte-Carlo pass must return a tensor, got {type(out).__name__}")
    return out


# The name this context manager had before it took the mixin's (and MCDropout's) word.
mc_mode = mc_dropout

__all__ = [
    "OUTPUT_KINDS",
    "MCOutput",
    "deterministic_prefix",
    "deterministic_reason",
    "gaussian_step",
    "independent_replica_masks",
    "mc_dropout",
    "mc_mode",
    "mc_predict",
    "mc_samples",
    "replicate",
    "seeded",
    "summarize",
]
