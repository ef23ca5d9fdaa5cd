"""Which modules drop during Monte-Carlo passes, and the warnings about passes that cannot differ.

:func:`mc_dropout` makes every dropout site of a model drop (dropout modules, attention
dropout inside ``scaled_dot_product_attention``, rates read in a forward; see
:mod:`lightning_dropout.sites`) by turning on only the ``training`` flags that gate them, so
BatchNorm keeps its running statistics untouched, and restores every module's mode on
exit. DropConnect layers draw one weight mask per forward call, which would make every
replica of a batched pass identical; :func:`independent_replica_masks` sets their
``mask_groups`` to the number of replicas so that each replica gets its own mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

from torch import nn

from lightning_dropout._validation import check_positive_int
from lightning_dropout.layers import WeightMaskLayer
from lightning_dropout.sites import DropoutSite, select_sites, sites_training


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
        >>> from lightning_dropout.sites import find_sites
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


__all__ = [
    "STRAY_DRAWS_MESSAGE",
    "deterministic_prefix",
    "deterministic_reason",
    "inconsistent_message",
    "independent_replica_masks",
    "mc_dropout",
]
