"""Layers with DropConnect built in (Wan et al., "Regularization of Neural Networks using
DropConnect", ICML 2013): :class:`DropConnectLinear` and ``DropConnectConv1d/2d/3d``.

Training: each weight is kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``
(inverted), so no rescaling is needed at evaluation. ``per_sample=False`` draws one
weight mask per forward call (cheap: one masked copy of the weight); ``per_sample=True``
draws an independent mask for every sample, as in the paper. Per-sample masks are never
materialised for the whole batch: the batch is processed in chunks whose masked weights
fit in ``max_mask_bytes``, and each chunk's mask is regenerated from its seed in backward
(activation checkpointing) instead of being kept alive until then.

Evaluation, ``inference="mean"``: the plain weights. ``inference="gaussian"``: the paper's
moment-matched Gaussian. With keep probability q = 1 - p and inverted scaling, the
pre-activation of a training pass has mean ``W v + b`` and variance
``(p / (1 - p)) (W * W)(v * v)``; evaluation draws ``n_samples`` pre-activations from that
Gaussian and averages ``activation(u)`` over them. The ``activation`` is part of the layer
in training too, so both modes compute the same function of the same random variable.

Note the name clash: timm's "drop connect" means drop-path; here it is weight masking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_dropout import kernels
from lightning_dropout._validation import check_bool, check_choice, check_positive_int
from lightning_dropout.layers.base import WeightMaskLayer
from lightning_dropout.layers.common import (
    keep_mask,
    keep_scale,
    p_equals,
    transforms_active,
    zeros_like_connected,
)
from lightning_dropout.layers.drop_connect import drop_connect

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "elu": F.elu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
INFERENCE_MODES = ("mean", "gaussian")
DEFAULT_MAX_MASK_BYTES = 64 * 2**20

# (x chunk of shape (c, b, ...), weights of shape (c, *weight.shape), bias) -> (c, b, ...)
GroupedProduct = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def resolve_activation(activation: str | nn.Module | None) -> Callable[[Tensor], Tensor]:
    """The callable for ``activation``: a name from :data:`ACTIVATIONS`, a module or None.

    Raises:
        ValueError: an unknown name.
        TypeError: neither a string, a module nor None.
    """
    if activation is None:
        return ACTIVATIONS["identity"]
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        return ACTIVATIONS[activation]
    raise TypeError(f"activation must be a name, an nn.Module or None, got {type(activation).__name__}")


def _draw_seed() -> int:
    # From torch's global CPU generator: torch.manual_seed (and per-rank streams) apply,
    # and drawing on the CPU costs no device synchronisation.
    return int(torch.randint(0, 2**62, (1,)).item())


def _masked_group_product(
    x: Tensor, weight: Tensor, bias: Tensor | None, p: float | Tensor, product: GroupedProduct
) -> Tensor:
    keep = keep_mask((x.shape[0], *weight.shape), p, weight)
    return product(x, torch.where(keep, weight * keep_scale(p), 0.0), bias)


def _fits_masked_linear_kernel(x: Tensor, weight: Tensor, p: float | Tensor) -> bool:
    """Whether the per-group masked-linear kernel computes this call as torch would.

    Not under autocast (``nn.Linear`` computes in the autocast dtype there, the kernel in
    the input's), not inside a torch.func transform (its masks come from seeds read on the
    host) and not for a tensor ``p`` (compiled graphs).
    """
    return (
        not isinstance(p, Tensor)
        and not torch.is_autocast_enabled(x.device.type)
        and not transforms_active()
        and kernels.fits_group_masked_linear(x, weight)
    )


def grouped_drop_connect(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: float | Tensor,
    groups: int,
    product: GroupedProduct,
    max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES,
    linear: bool = False,
) -> Tensor:
    """Apply ``product`` with an independent weight mask per group of the batch.

    The batch (dimension 0 of ``x``) is split into ``groups`` equal contiguous groups;
    ``groups == len(x)`` is per-sample DropConnect. Groups are processed in chunks whose
    masked weights take at most ``max_mask_bytes`` (at least one group per chunk); under
    autograd each chunk is checkpointed, so backward draws its masks again (from the
    random state the chunk started from) rather than keeping every chunk's masked weights
    alive. Inside a torch.func transform or a compiled graph, which refuse checkpoints,
    the masked weights are kept. ``linear``: ``product`` is ``F.linear``'s, which a kernel
    may compute from a chunk's masks alone, never building its masked weights. Every path
    is differentiable to any order, and ``p`` may be a 0-d tensor (compiled layers).

    Raises:
        ValueError: the batch size is not a multiple of ``groups``.
    """
    batch = x.shape[0]
    if batch == 0:
        groups = 1  # an empty batch (per sample: zero groups) is one group of no rows
    if batch % groups:
        raise ValueError(f"batch size {batch} is not a multiple of mask groups {groups}")
    grouped = x.reshape(groups, batch // groups, *x.shape[1:])
    chunk = max(1, max_mask_bytes // max(1, weight.numel() * weight.element_size()))
    if linear and _fits_masked_linear_kernel(x, weight, p):
        assert not isinstance(p, Tensor)
        # One call for every chunk: it draws each chunk's masks again in backward itself.
        seeds = [_draw_seed() for _ in range(0, groups, chunk)]
        out = kernels.group_masked_linear(grouped.reshape(groups, -1, x.shape[-1]), weight, p, seeds)
        assert out is not None
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    checkpointed = (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and not transforms_active()
        and not torch.compiler.is_compiling()
    )
    outputs = []
    for start in range(0, groups, chunk):
        args = (grouped[start : start + chunk], weight, bias, p, product)
        if checkpointed:
            outputs.append(checkpoint(_masked_group_product, *args, use_reentrant=False))
        else:
            outputs.append(_masked_group_product(*args))
    result = torch.cat(outputs)
    return result.reshape(batch, *result.shape[2:])


class DropConnectLayer(WeightMaskLayer):
    """The DropConnect behaviour shared by :class:`DropConnectLinear` and the convolutions.

    ``mask_groups`` (default 1) splits the batch into that many equal groups with
    independent masks (see :class:`~lightning_dropout.layers.WeightMaskLayer`);
    ``per_sample=True`` overrides it.
    """

    site_kind = "dropconnect"
    weight: Tensor
    bias: Any
    training: bool

    def _init_drop_connect(
        self,
        p: float,
        per_sample: bool,
        inference: str,
        activation: str | nn.Module | None,
        n_samples: int,
        max_mask_bytes: int,
    ) -> None:
        self._init_weight_mask(p)
        self.per_sample = check_bool("per_sample", per_sample)
        self.inference = inference
        resolve_activation(activation)  # refuse a bad one now, not at the first forward
        # A plain attribute: a module activation (PReLU, say) registers as a submodule.
        self.activation = activation
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.max_mask_bytes = check_positive_int("max_mask_bytes", max_mask_bytes)

    @property
    def inference(self) -> str:
        """``"mean"`` or ``"gaussian"``: how evaluation forwards treat the weights."""
        return self._inference

    @inference.setter
    def inference(self, value: str) -> None:
        self._inference = check_choice("inference", value, INFERENCE_MODES)

    def _group_attributes(self, groups: int) -> dict[str, Any]:
        return {} if self.per_sample else super()._group_attributes(groups)

    def _one_mask_attributes(self) -> dict[str, Any]:
        return {**super()._one_mask_attributes(), "per_sample": False}

    def _product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _grouped_product(self, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _unbatched_dims(self) -> int:
        raise NotImplementedError

    def _fused_grouped_product(self, x: Tensor, p: float | Tensor) -> Tensor | None:
        """The grouped masked product on a kernel that never stores the masks, or None."""
        return None

    @property
    def _activation(self) -> Callable[[Tensor], Tensor]:
        return resolve_activation(self.activation)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            if self.inference == "mean" or self.p == 0.0:
                return self._activation(self._product(x, self.weight, self.bias))
            return self._gaussian_inference(x)
        p = self.forward_p
        grouped = self.per_sample or self.mask_groups > 1
        if grouped:
            fused = self._fused_grouped_product(x, p)
            if fused is not None:
                return self._activation(fused)
        if p_equals(p, 0.0):
            return self._activation(self._product(x, self.weight, self.bias))
        if p_equals(p, 1.0):
            return self._all_dropped(x)
        if grouped:
            return self._activation(self._grouped(x, p))
        return self._activation(self._product(x, drop_connect(self.weight, p), self.bias))

    def _grouped(self, x: Tensor, p: float | Tensor) -> Tensor:
        unbatched = self.per_sample and x.dim() == self._unbatched_dims()
        if unbatched:
            x = x.unsqueeze(0)
        groups = x.shape[0] if self.per_sample else self.mask_groups
        linear = isinstance(self, nn.Linear)
        out = grouped_drop_connect(
            x, self.weight, self.bias, p, groups, self._grouped_product, self.max_mask_bytes, linear
        )
        if unbatched:
            return out.squeeze(0)
        # as torch's layers do: a channels_last input gives a channels_last output
        memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if (
            memory_format is not None
            and not transforms_active()  # vmap hides the batched layout
            and x.is_contiguous(memory_format=memory_format)
            and not x.is_contiguous()
        ):
            return out.contiguous(memory_format=memory_format)
        return out

    def _all_dropped(self, x: Tensor) -> Tensor:
        # Every weight dropped: the output is the bias alone, exactly, with zero gradients,
        # even where x is infinite (0 * inf would be NaN inside the product).
        zeros = zeros_like_connected(x), zeros_like_connected(self.weight)
        return self._activation(self._product(*zeros, self.bias))

    def _gaussian_inference(self, x: Tensor) -> Tensor:
        if self.p == 1.0:
            return self._all_dropped(x)
        mean = self._product(x, self.weight, self.bias)
        variance = self._product(x * x, self.weight * self.weight, None) * (self.p / (1.0 - self.p))
        std = variance.clamp_min(0.0).sqrt()
        total = torch.zeros_like(mean)
        for _ in range(self.n_samples):
            total += self._activation(torch.randn_like(mean).mul_(std).add_(mean))
        return total / self.n_samples

    def _drop_connect_repr(self) -> str:
        extra = f", p={self.p}, per_sample={self.per_sample}, inference={self.inference!r}"
        if isinstance(self.activation, str):  # a module activation shows as a child
            extra += f", activation={self.activation!r}"
        if self.inference == "gaussian":
            extra += f", n_samples={self.n_samples}"
        return extra


class DropConnectLinear(DropConnectLayer, nn.Linear):
    """A Linear layer whose weights are dropped (DropConnect, Wan et al., ICML 2013).

    A drop-in ``nn.Linear`` (same parameters and state_dict keys) computing
    ``activation(x W_masked^T + b)`` in training.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias (never dropped).
        p: probability of dropping each weight, in [0, 1]; may be reassigned.
        per_sample: an independent mask for every sample (the paper) rather than one per
            forward call.
        inference: ``"mean"`` (plain weights at evaluation) or ``"gaussian"`` (the paper's
            moment-matched Gaussian sampling, averaged over ``n_samples``).
        activation: applied after the product in both modes: a name (``"relu"``,
            ``"tanh"``, ...), a module, or None for the identity. Gaussian inference
            needs the nonlinearity here to average it over samples.
        n_samples: Gaussian samples per evaluation forward.
        max_mask_bytes: the most bytes of per-sample masked weights held at once.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: ``p`` outside [0, 1], an unknown ``inference`` or ``activation``,
            ``n_samples`` or ``max_mask_bytes`` below 1.

    Example:
        >>> layer = DropConnectLinear(3, 2, p=0.5)
        >>> layer(torch.randn(4, 3)).shape
        torch.Size([4, 2])
        >>> _ = layer.eval()
        >>> x = torch.ones(1, 3)
        >>> torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: float = 0.5,
        per_sample: bool = False,
        inference: str = "mean",
        activation: str | nn.Module | None = None,
        n_samples: int = 100,
        max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_drop_connect(p, per_sample, inference, activation, n_samples, max_mask_bytes)

    def _product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _grouped_product(self, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if bias is None:
            out = torch.bmm(flat, weights.transpose(1, 2))
        else:
            out = torch.baddbmm(bias, flat, weights.transpose(1, 2))
        return out.reshape(*x.shape[:-1], weights.shape[1])

    def _unbatched_dims(self) -> int:
        return 1

    def _fused_grouped_product(self, x: Tensor, p: float | Tensor) -> Tensor | None:
        # On CUDA the masks are regenerated inside the products, never stored. Compiled,
        # p is read from the device (any p in [0, 1], no recompile when it changes).
        if not isinstance(p, Tensor) and not 0.0 < p < 1.0:
            return None
        groups = x.shape[0] if self.per_sample and x.dim() > 1 else self.mask_groups
        return kernels.fast_drop_connect_linear(x, self.weight, self.bias, p, groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._drop_connect_repr()


class _DropConnectConvNd(DropConnectLayer):
    """Shared by DropConnectConv1d/2d/3d; the concrete class also derives from nn.ConvNd."""

    spatial_dims: int
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int
    padding_mode: Any
    _reversed_padding_repeated_twice: list[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        p: float = 0.5,
        per_sample: bool = False,
        inference: str = "mean",
        activation: str | nn.Module | None = None,
        n_samples: int = 100,
        max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # The next class in the MRO with an __init__ is the concrete nn.ConvNd.
        super().__init__(  # type: ignore[call-arg]
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_drop_connect(p, per_sample, inference, activation, n_samples, max_mask_bytes)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv(x, weight, bias, self.groups)

    def _grouped_product(self, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
        # c groups of b samples become one grouped convolution over b samples with
        # c * in_channels channels, so each group meets only its own masked weights.
        c, b = x.shape[:2]
        stacked = x.transpose(0, 1).reshape(b, c * x.shape[2], *x.shape[3:])
        flat_weights = weights.reshape(c * weights.shape[1], *weights.shape[2:])
        flat_bias = None if bias is None else bias.repeat(c)
        out = self._conv(stacked, flat_weights, flat_bias, c * self.groups)
        return out.reshape(b, c, weights.shape[1], *out.shape[2:]).transpose(0, 1)

    def _unbatched_dims(self) -> int:
        return self.spatial_dims + 1

    def extra_repr(self) -> str:
        return nn.modules.conv._ConvNd.extra_repr(self) + self._drop_connect_repr()  # type: ignore[arg-type]


class DropConnectConv1d(_DropConnectConvNd, nn.Conv1d):
    """A Conv1d whose weights are dropped (DropConnect, Wan et al., ICML 2013).

    A drop-in ``nn.Conv1d`` (same parameters and state_dict keys): the convolution's
    arguments first, then the DropConnect ones, as documented in
    :class:`DropConnectLinear`. Per-sample masks run as one grouped convolution per
    chunk of samples.

    Example:
        >>> layer = DropConnectConv1d(2, 4, 3, padding=1, p=0.25, per_sample=True)
        >>> layer(torch.randn(2, 2, 5)).shape
        torch.Size([2, 4, 5])
    """

    spatial_dims = 1


class DropConnectConv2d(_DropConnectConvNd, nn.Conv2d):
    """A Conv2d whose weights are dropped (DropConnect, Wan et al., ICML 2013).

    Arguments as :class:`DropConnectConv1d`.

    Example:
        >>> layer = DropConnectConv2d(2, 4, 3, padding=1, p=0.25)
        >>> layer(torch.randn(2, 2, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    spatial_dims = 2


class DropConnectConv3d(_DropConnectConvNd, nn.Conv3d):
    """A Conv3d whose weights are dropped (DropConnect, Wan et al., ICML 2013).

    Arguments as :class:`DropConnectConv1d`.

    Example:
        >>> layer = DropConnectConv3d(2, 4, 3, padding=1, p=0.25)
        >>> layer(torch.randn(1, 2, 4, 4, 4)).shape
        torch.Size([1, 4, 4, 4, 4])
    """

    spatial_dims = 3
