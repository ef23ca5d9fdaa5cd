"""Channel dropout, a.k.a. SpatialDropout (Tompson et al., "Efficient Object
Localization Using Convolutional Networks", CVPR 2015).

Neighbouring units of a feature map are strongly correlated, so dropping single
elements barely regularizes a convolutional network: the neighbours carry the same
information. These layers drop whole channels instead, independently per sample.

Input shapes, decided once for all three layers: a batched input is
``(N, C, *spatial)`` and an unbatched one ``(C, *spatial)``, with 1, 2 or 3 spatial
dimensions. ``Dropout2d`` refuses a 3-D input unless told which it is: torch's own
``Dropout2d`` treats it as ``(N, C, L)`` (1-D dropout, with only a warning) while the
natural reading is an unbatched ``(C, H, W)`` image. Pass ``batched=False`` for the latter
or use :class:`Dropout1d` for the former.
"""

from __future__ import annotations

from torch import Tensor

from lightning_dropout import kernels
from lightning_dropout._validation import check_bool
from lightning_dropout.layers.base import DropoutBase
from lightning_dropout.layers.common import check_floating, check_p, evaluation_output, exact_output


def _is_batched(x: Tensor, spatial_dims: int, batched: bool | None) -> bool:
    name = f"Dropout{spatial_dims}d"
    expected = {spatial_dims + 1: False, spatial_dims + 2: True}
    if x.dim() not in expected:
        raise ValueError(
            f"{name} expects a {spatial_dims + 2}-D batched input (N, C, *spatial) or a "
            f"{spatial_dims + 1}-D unbatched input (C, *spatial); got input of shape "
            f"{tuple(x.shape)}"
        )
    if batched is None:
        if spatial_dims == 2 and x.dim() == 3:
            raise ValueError(
                f"Dropout2d got a 3-D input of shape {tuple(x.shape)}, which is ambiguous: "
                "for a batch of sequences (N, C, L) use Dropout1d; for one unbatched image "
                "(C, H, W) pass batched=False (or add the batch dimension with x.unsqueeze(0))"
            )
        return expected[x.dim()]
    if expected[x.dim()] != batched:
        raise ValueError(
            f"{name} was told batched={batched} but got a {x.dim()}-D input of shape "
            f"{tuple(x.shape)}; a {'batched' if batched else 'unbatched'} input has "
            f"{spatial_dims + (2 if batched else 1)} dimensions"
        )
    return batched


def channel_dropout(
    x: Tensor,
    p: float | Tensor = 0.5,
    training: bool = True,
    spatial_dims: int = 2,
    inverted: bool = True,
    inplace: bool = False,
    batched: bool | None = None,
) -> Tensor:
    """Zero whole channels of ``x``, each independently with probability ``p`` per sample.

    Args:
        x: floating-point input ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``.
        p: drop probability in [0, 1], a float or a 0-d tensor (see
            :mod:`lightning_dropout.layers.common`).
        training: draw a mask (True) or apply the evaluation rule (False).
        spatial_dims: 1, 2 or 3 spatial dimensions after the channel dimension.
        inverted: scale kept channels by ``1 / (1 - p)`` in training (True) or scale by
            ``1 - p`` in evaluation (False).
        inplace: overwrite ``x``.
        batched: whether ``x`` has a batch dimension; ``None`` infers it from the number
            of dimensions and refuses the ambiguous 3-D input of 2-D dropout.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``p`` is not a number.
        ValueError: ``p`` outside [0, 1], ``spatial_dims`` not 1, 2 or 3, or an input
            whose shape does not fit (or is ambiguous).

    Example:
        >>> y = channel_dropout(torch.ones(2, 3, 2, 4), p=0.5)
        >>> bool(((y == 0) | (y == 2)).all())
        True
        >>> bool((y.amax(dim=(2, 3)) == y.amin(dim=(2, 3))).all())  # whole channels
        True
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    check_floating(x)
    p = check_p(p)
    is_batched = _is_batched(x, spatial_dims, batched)
    if not training:
        return evaluation_output(x, p, inverted, inplace)
    if (exact := exact_output(x, p, inplace)) is not None:
        return exact
    if is_batched:
        return kernels.drop_channels(x, p, inverted, inplace)
    return kernels.drop_channels(x.unsqueeze(0), p, inverted, inplace).squeeze(0)


class ChannelDropout(DropoutBase):
    """Base of :class:`Dropout1d`, :class:`Dropout2d` and :class:`Dropout3d`, which set
    ``spatial_dims``; arguments as :class:`Dropout2d`."""

    site_kind = "channel"
    spatial_dims: int

    def __init__(
        self,
        p: float = 0.5,
        inplace: bool = False,
        inverted: bool = True,
        batched: bool | None = None,
    ) -> None:
        super().__init__(p)
        if batched is not None and not isinstance(batched, bool):
            raise TypeError(f"batched must be a bool or None, got {batched!r}")
        self.inplace = check_bool("inplace", inplace)
        self.inverted = check_bool("inverted", inverted)
        self.batched = batched

    def forward(self, x: Tensor) -> Tensor:
        return channel_dropout(
            x, self.forward_p, self.training, self.spatial_dims, self.inverted, self.inplace, self.batched
        )

    def as_batched(self, x: Tensor) -> Tensor:
        """``x`` as this layer reads it, ``(N, C, *spatial)``: an unbatched input as a batch of one.

        Raises:
            ValueError: a shape that does not fit, or is ambiguous (as in ``forward``).

        Example:
            >>> Dropout2d(batched=False).as_batched(torch.ones(3, 4, 4)).shape
            torch.Size([1, 3, 4, 4])
        """
        return x if _is_batched(x, self.spatial_dims, self.batched) else x.unsqueeze(0)

    def extra_repr(self) -> str:
        extra = "" if self.batched is None else f", batched={self.batched}"
        return f"p={self.p}, inplace={self.inplace}, inverted={self.inverted}{extra}"


class Dropout1d(ChannelDropout):
    """Drop whole channels of ``(N, C, L)`` (or unbatched ``(C, L)``) inputs.

    SpatialDropout for sequences (Tompson et al., CVPR 2015). Arguments as
    :class:`Dropout2d`.

    Example:
        >>> y = Dropout1d(p=0.5)(torch.ones(4, 3, 7))
        >>> bool((y.amax(dim=2) == y.amin(dim=2)).all())
        True
    """

    spatial_dims = 1


class Dropout2d(ChannelDropout):
    """Drop whole channels of ``(N, C, H, W)`` inputs (SpatialDropout, Tompson et al. 2015).

    Args:
        p: probability of dropping a channel, in [0, 1]; may be reassigned between steps.
        inplace: overwrite the input.
        inverted: scale kept channels by ``1 / (1 - p)`` in training (True) or all
            channels by ``1 - p`` in evaluation (False).
        batched: whether inputs have a batch dimension; ``None`` infers it from the number
            of dimensions and refuses a 3-D input, which is ambiguous (see the module doc).

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: ``p`` outside [0, 1]; in forward, an input of the wrong or an
            ambiguous shape.

    Example:
        >>> y = Dropout2d()(torch.ones(2, 3, 2, 4))
        >>> bool(((y == 0) | (y == 2)).all())
        True
    """

    spatial_dims = 2


class Dropout3d(ChannelDropout):
    """Drop whole channels of ``(N, C, D, H, W)`` (or unbatched ``(C, D, H, W)``) inputs.

    SpatialDropout for volumes (Tompson et al., CVPR 2015). Arguments as
    :class:`Dropout2d`.

    Example:
        >>> y = Dropout3d(p=0.5)(torch.ones(2, 3, 2, 2, 2))
        >>> bool((y.flatten(2).amax(2) == y.flatten(2).amin(2)).all())
        True
    """

    spatial_dims = 3
