"""Monte-Carlo dropout inference and its uncertainty summaries (pure PyTorch).

A network trained with dropout is an ensemble of thinned networks with shared weights;
averaging many stochastic forward passes approximates the Bayesian predictive
distribution (Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016).

- :mod:`~lightning_dropout.mc.modes`: :func:`mc_dropout` makes every dropout site drop and
  nothing else change mode; per-replica weight masks; why passes could not differ.
- :mod:`~lightning_dropout.mc.sampling`: drawing the passes, looped or batched on the
  input replicated along dim 0; :func:`seeded`.
- :mod:`~lightning_dropout.mc.summaries`: :class:`MCOutput` and the streaming
  :func:`summarize` (predictive mean, entropy, BALD, aleatoric and epistemic parts, the
  Monte-Carlo standard error of the mean).
- :mod:`~lightning_dropout.mc.passes`: :class:`MCPasses`, the one place passes run (used by
  :func:`mc_predict` and the ``MCDropout`` callback): consistent masks, ``n_samples="auto"``,
  a fitted temperature.

Options of :func:`mc_predict`: ``sites`` restricts the sampling to some sites (globs, as
everywhere in the package); ``consistent=True`` gives every replica one fixed sub-network
for all inputs (:mod:`lightning_dropout.consistent_masks`); ``seed`` makes a run
reproducible without touching torch's global random stream; ``n_samples="auto"`` stops
when the Monte-Carlo standard error of the mean is below ``tolerance``. When the model is
an ``nn.Sequential`` whose first children hold no dropping site, those children run once
per batch, not once per pass.
"""

from lightning_dropout.mc.modes import (
    STRAY_DRAWS_MESSAGE,
    deterministic_prefix,
    deterministic_reason,
    inconsistent_message,
    independent_replica_masks,
    mc_dropout,
)
from lightning_dropout.mc.passes import (
    AUTO,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_TOLERANCE,
    MCPasses,
    PassResult,
    check_n_samples,
    mc_predict,
)
from lightning_dropout.mc.sampling import (
    batch_size,
    default_chunk,
    gaussian_step,
    mc_samples,
    replicate,
    seeded,
)
from lightning_dropout.mc.summaries import OUTPUT_KINDS, MCOutput, summarize

__all__ = [
    "AUTO",
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_TOLERANCE",
    "OUTPUT_KINDS",
    "STRAY_DRAWS_MESSAGE",
    "MCOutput",
    "MCPasses",
    "PassResult",
    "batch_size",
    "check_n_samples",
    "default_chunk",
    "deterministic_prefix",
    "deterministic_reason",
    "gaussian_step",
    "inconsistent_message",
    "independent_replica_masks",
    "mc_dropout",
    "mc_predict",
    "mc_samples",
    "replicate",
    "seeded",
    "summarize",
]
