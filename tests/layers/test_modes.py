"""Every layer family in every mode a user runs (the mode matrix).

Modes: grad / no_grad / inference_mode in any order (in fresh processes, a first call
under inference_mode), torch.func (vmap with torch's ``randomness`` contract, grad through
``functional_call``), second derivatives (gradgradcheck in float64 with masks fixed by a
seed before each call), autocast, channels_last, torch.compile with a changing p, several
threads, forked children and DataLoader workers. Each family runs on a small input and on
one large enough for the CPU fast path.

Run as a script (``python test_modes.py ORDER``), this file is the fresh process the
grad-mode tests start: it runs every family in that order of modes, then forks.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call, vmap

from lightning_dropout import (
    ConcreteDropout,
    DropBlock2d,
    DropConnect,
    DropConnectConv1d,
    DropConnectConv2d,
    DropConnectConv3d,
    DropConnectLinear,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    DropPath,
    EmbeddingDropout,
    GaussianDropout,
    LockedDropout,
)
from lightning_dropout.layers import DropProbability

P = 0.3


@dataclass(frozen=True)
class Family:
    """A layer family: how to build it, its inputs, and torch's layer it follows.

    ``weights``: func.grad and gradgradcheck differentiate the layer's parameters (a
    layer that drops weights) rather than its input. ``image``: the input is a feature map
    (channels_last applies). ``scale``: every entry of ``output / input`` is 0 or this
    (layers that drop entries of their input), None otherwise.
    """

    name: str
    make: Callable[[bool], nn.Module]
    input: Callable[[bool], Tensor]
    counterpart: Callable[[bool], nn.Module]
    weights: bool = False
    image: bool = False
    scale: float | None = 1 / (1 - P)


def _linear(per_sample: bool) -> Callable[[bool], nn.Module]:
    return lambda large: DropConnectLinear(*((256, 128) if large else (6, 4)), p=P, per_sample=per_sample)


def _conv(dims: int, per_sample: bool) -> Callable[[bool], nn.Module]:
    layer = (DropConnectConv1d, DropConnectConv2d, DropConnectConv3d)[dims - 1]
    channels = (32, 32, 16)[dims - 1]
    return lambda large: layer(
        *((channels, channels) if large else (2, 3)), 3, padding=1, p=P, per_sample=per_sample
    )


def _conv_counterpart(dims: int) -> Callable[[bool], nn.Module]:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    channels = (32, 32, 16)[dims - 1]
    return lambda large: conv(*((channels, channels) if large else (2, 3)), 3, padding=1)


def _conv_input(dims: int) -> Callable[[bool], Tensor]:
    large = {1: (4, 32, 32), 2: (4, 32, 8, 8), 3: (2, 16, 4, 4, 4)}[dims]
    small = (3, 2, *[5] * dims)
    return lambda is_large: torch.randn(large if is_large else small)


def _positive(*shape: int) -> Callable[[bool], Tensor]:
    """Inputs away from 0, so that ``output / input`` reads the mask."""
    return lambda large: torch.rand(shape if large else (2, *shape[1:-1], 3)) + 0.5


def _image(large: tuple[int, ...], small: tuple[int, ...]) -> Callable[[bool], Tensor]:
    return lambda is_large: torch.rand(large if is_large else small) + 0.5


FAMILIES = [
    Family(
        "Dropout",
        lambda large: Dropout(P),
        _image((64, 64, 8, 8), (2, 3, 2, 4)),
        lambda large: nn.Dropout(P),
        image=True,
    ),
    Family("Dropout1d", lambda large: Dropout1d(P), _positive(16, 64, 64), lambda large: nn.Dropout1d(P)),
    Family(
        "Dropout2d",
        lambda large: Dropout2d(P),
        _image((16, 32, 16, 16), (2, 3, 2, 4)),
        lambda large: nn.Dropout2d(P),
        image=True,
    ),
    Family(
        "Dropout3d",
        lambda large: Dropout3d(P),
        _image((4, 16, 8, 8, 8), (2, 3, 2, 2, 2)),
        lambda large: nn.Dropout3d(P),
        image=True,
    ),
    Family(
        "GaussianDropout",
        lambda large: GaussianDropout(P),
        _image((8, 64, 8, 8), (2, 3, 2, 4)),
        lambda large: nn.Dropout(P),
        image=True,
        scale=None,
    ),
    Family(
        "DropPath",
        lambda large: DropPath(P),
        _image((64, 8, 8, 8), (4, 3, 2, 2)),
        lambda large: nn.Dropout(P),
        image=True,
    ),
    Family(
        "DropBlock2d",
        lambda large: DropBlock2d(P, block_size=3, normalize="expected"),
        _image((8, 16, 32, 32), (2, 2, 5, 5)),
        lambda large: nn.Dropout2d(P),
        image=True,
    ),
    Family(
        "LockedDropout", lambda large: LockedDropout(P), _positive(16, 32, 256), lambda large: nn.Dropout(P)
    ),
    Family(
        "ConcreteDropout",
        lambda large: ConcreteDropout(P),
        _image((8, 64, 8, 8), (2, 3, 2, 4)),
        lambda large: nn.Dropout(P),
        image=True,
        scale=None,
    ),
    Family(
        "EmbeddingDropout",
        lambda large: EmbeddingDropout(nn.Embedding(4096 if large else 10, 8), P),
        lambda large: torch.randint(0, 4096 if large else 10, (16, 64) if large else (3, 4)),
        lambda large: nn.Embedding(4096 if large else 10, 8),
        weights=True,
        scale=None,
    ),
    Family(
        "DropConnectLinear",
        _linear(False),
        lambda large: torch.randn((8, 256) if large else (5, 6)),
        lambda large: nn.Linear(*((256, 128) if large else (6, 4))),
        weights=True,
        scale=None,
    ),
    Family(
        "DropConnectLinear(per_sample)",
        _linear(True),
        lambda large: torch.randn((8, 256) if large else (5, 6)),
        lambda large: nn.Linear(*((256, 128) if large else (6, 4))),
        weights=True,
        scale=None,
    ),
    *[
        Family(
            f"DropConnectConv{dims}d" + ("(per_sample)" if per_sample else ""),
            _conv(dims, per_sample),
            _conv_input(dims),
            _conv_counterpart(dims),
            weights=True,
            image=dims == 2,
            scale=None,
        )
        for dims in (1, 2, 3)
        for per_sample in (False, True)
    ],
    Family(
        "DropConnect(Linear)",
        lambda large: DropConnect(nn.Linear(*((256, 128) if large else (6, 4))), P),
        lambda large: torch.randn((8, 256) if large else (5, 6)),
        lambda large: nn.Linear(*((256, 128) if large else (6, 4))),
        weights=True,
        scale=None,
    ),
]
BY_NAME = {family.name: family for family in FAMILIES}
SIZES = [pytest.param(False, id="small"), pytest.param(True, id="large")]


def build(family: Family, large: bool, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    layer, x = family.make(large).to(dtype), family.input(large)
    return layer, (x.to(dtype) if x.is_floating_point() else x)


def check_mask_scale(family: Family, x: Tensor, y: Tensor) -> None:
    """Every entry of ``y / x`` is 0 or the family's scale (layers that drop input entries)."""
    if family.scale is None:
        return
    ratio = (y / x).double()
    kept = (ratio - family.scale).abs() < 1e-4 * family.scale
    assert bool((kept | (ratio == 0)).all()), f"{family.name}: entries neither dropped nor scaled"
    if x.numel() >= 4096:  # enough draws (64 at least) that all or none kept would be a bug
        assert 0 < float(kept.double().mean()) < 1, f"{family.name}: nothing or everything dropped"


def params_and_args(family: Family, layer: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The tensors func.grad differentiates (the parameters, or the input as ``"input"``)."""
    if family.weights:
        return {name: t.detach() for name, t in layer.named_parameters()}, x
    return {"input": x}, x


def call(layer: nn.Module, family: Family, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    if family.weights:
        return functional_call(layer, tensors, (x,))
    return layer(tensors["input"])


def train_step(family: Family, layer: nn.Module, x: Tensor) -> None:
    """A training forward and backward; the output's entries are the mask's."""
    layer.train()
    source = x.clone().requires_grad_() if x.is_floating_point() else x
    y = layer(source)
    check_mask_scale(family, x, y.detach())
    wrt = [source] if source.is_floating_point() else []
    wrt += list(layer.parameters())
    grads = torch.autograd.grad(y.square().sum(), wrt)
    assert all(bool(g.isfinite().all()) for g in grads), family.name


def run_without_grad(family: Family, layer: nn.Module, x: Tensor) -> None:
    y = layer(x)
    assert not y.requires_grad
    check_mask_scale(family, x, y)


# ------------------------------------------------------------------ grad-mode orders, fork

ORDERS = {
    "inference-first": ("inference", "grad", "no_grad", "grad", "inference", "grad"),
    "no_grad-first": ("no_grad", "inference", "grad", "no_grad", "grad"),
}


def _in_mode(mode: str, family: Family, layer: nn.Module, x: Tensor) -> None:
    if mode == "grad":
        train_step(family, layer, x)
    else:
        with torch.inference_mode() if mode == "inference" else torch.no_grad():
            run_without_grad(family, layer, x)


def _child_train_steps(cases: list[tuple[Family, nn.Module, Tensor]]) -> list[str]:
    failed = []
    for family, layer, x in cases:
        try:
            train_step(family, layer, x)
        except Exception as error:  # reported by name to the parent
            failed.append(f"{family.name}: {error!r}")
    return failed


def _exit_with_child_failures(cases: list[tuple[Family, nn.Module, Tensor]]) -> None:
    # As DataLoader workers do: GNU OpenMP hangs in a child forked after the parent ran a
    # parallel region (torch's own ops too), unless the child runs on one thread.
    torch.set_num_threads(1)
    failed = _child_train_steps(cases)
    print("\n".join(failed), flush=True)
    sys.exit(1 if failed else 0)


class _TrainInWorkers(torch.utils.data.Dataset[list[str]]):
    def __init__(self, cases: list[tuple[Family, nn.Module, Tensor]]) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> list[str]:
        return _child_train_steps(self.cases)


def run_orders(order: str) -> None:
    """Every family, small and large, through ``ORDERS[order]`` (after the first, the same
    training steps in forked children). Exits non-zero on failure."""
    cases = [(family, *build(family, large)) for family in FAMILIES for large in (False, True)]
    failed = []
    for mode in ORDERS[order]:
        for family, layer, x in cases:
            try:
                _in_mode(mode, family, layer, x)
            except Exception as error:
                failed.append(f"{mode} {family.name} {tuple(x.shape)}: {error!r}")
    if order == "inference-first":  # forks once, after the order that used to poison a process
        failed += _forked_failures(cases)
    print("\n".join(failed))
    sys.exit(1 if failed else 0)


def _forked_failures(cases: list[tuple[Family, nn.Module, Tensor]]) -> list[str]:
    """The training steps in a forked child and in forked DataLoader workers."""
    failed = []
    child = multiprocessing.get_context("fork").Process(target=_exit_with_child_failures, args=(cases,))
    child.start()  # forked: the arguments are inherited, not pickled
    child.join(timeout=120)
    if child.exitcode != 0:
        failed.append(f"forked child: exit code {child.exitcode} (its failures printed above)")
    loader = torch.utils.data.DataLoader(
        _TrainInWorkers(cases), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    return failed + [f"DataLoader worker: {f}" for batch in loader for f in batch]


@pytest.mark.parametrize("order", list(ORDERS))
def test_grad_modes_in_any_order_and_forked_children(order: str) -> None:
    result = subprocess.run(
        [sys.executable, __file__, order], capture_output=True, text=True, timeout=240, env={**os.environ}
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# ------------------------------------------------------------------ torch.func


def _stacked(x: Tensor, copies: int = 3) -> Tensor:
    return x.unsqueeze(0).expand(copies, *x.shape).contiguous()


@pytest.mark.parametrize("large", SIZES)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_vmap_follows_torchs_randomness_contract(family: Family, large: bool) -> None:
    layer, x = build(family, large)
    xs = _stacked(x)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(layer, randomness="error")(xs)
    same = vmap(layer, randomness="same")(xs)
    different = vmap(layer, randomness="different")(xs)
    assert same.shape == different.shape == (3, *layer(x).shape)
    for i in (1, 2):
        assert torch.allclose(same[0], same[i], rtol=1e-5, atol=1e-6), family.name
        assert not torch.allclose(different[0], different[i], rtol=1e-3, atol=1e-3), family.name
    check_mask_scale(family, xs, different)


@pytest.mark.parametrize("large", SIZES)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_func_grad_through_functional_call(family: Family, large: bool) -> None:
    """Every layer is linear in what is differentiated (its input, or its parameters for a
    layer that drops weights) for a given mask, so ``f(a) = <a, grad f(a)>``."""
    layer, x = build(family, large)
    tensors, x = params_and_args(family, layer, x)
    weights = torch.randn_like(layer(x).float())

    def loss(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        value = (call(layer, family, tensors, x) * weights).sum()
        return value, value

    grads, value = torch.func.grad(loss, has_aux=True)(tensors)
    euler = sum((tensors[name].double() * grads[name].double()).sum() for name in tensors)
    assert torch.allclose(euler, value.double(), rtol=1e-4, atol=1e-3), (
        family.name,
        float(euler),
        float(value),
    )


# ------------------------------------------------------------------ second derivatives


@pytest.mark.parametrize("large", SIZES)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_second_derivatives_match_finite_differences(family: Family, large: bool) -> None:
    layer, x = build(family, large, torch.float64)
    tensors, x = params_and_args(family, layer, x)
    names = list(tensors)
    if isinstance(layer, ConcreteDropout):  # its learned p too
        names, tensors = [*names, "p_logit"], {**tensors, "p_logit": layer.p_logit.detach()}

    def fixed_masks(*values: Tensor) -> Tensor:
        torch.manual_seed(1)
        given = dict(zip(names, values, strict=True))
        if "p_logit" in given:
            return functional_call(layer, {"p_logit": given.pop("p_logit")}, (given["input"],))
        return call(layer, family, given, x)

    inputs = tuple(tensors[name].clone().requires_grad_() for name in names)
    # fast mode: the Jacobians projected on random directions, not built entry by entry
    assert torch.autograd.gradgradcheck(fixed_masks, inputs, fast_mode=True)


def test_per_sample_conv_weight_gradient_norm_has_the_right_derivative() -> None:
    """d/dW of the squared norm of the weight gradient, against finite differences."""
    layer = DropConnectConv1d(2, 3, 3, p=0.5, per_sample=True).double()
    x = torch.randn(4, 2, 6, dtype=torch.float64)

    def penalty(weight: Tensor) -> Tensor:
        torch.manual_seed(3)
        out = functional_call(layer, {"weight": weight, "bias": layer.bias}, (x,))
        (grad,) = torch.autograd.grad(out.square().sum(), weight, create_graph=True)
        return grad.square().sum()

    weight = layer.weight.detach().clone().requires_grad_()
    (analytic,) = torch.autograd.grad(penalty(weight), weight)
    direction, eps = torch.randn_like(weight), 1e-6
    numeric = (penalty(weight + eps * direction) - penalty(weight - eps * direction)) / (2 * eps)
    assert torch.allclose((analytic * direction).sum(), numeric, rtol=1e-5)


# ------------------------------------------------------------------ autocast, memory format


@pytest.mark.parametrize("large", SIZES)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_autocast_gives_torchs_dtype(family: Family, large: bool) -> None:
    layer, x = build(family, large)
    counterpart = family.counterpart(large)
    source = x.clone().requires_grad_() if x.is_floating_point() else x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(source), counterpart(x)
    assert y.dtype == expected.dtype, family.name
    y.float().sum().backward()
    assert all(t.grad is not None for t in layer.parameters())


IMAGES = [f for f in FAMILIES if f.image]


@pytest.mark.parametrize("large", SIZES)
@pytest.mark.parametrize("family", IMAGES, ids=lambda f: f.name)
def test_memory_format_follows_torchs_layer(family: Family, large: bool) -> None:
    layer, x = build(family, large)
    memory_format = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    x = x.to(memory_format=memory_format).requires_grad_()
    expected = family.counterpart(large)(x).is_contiguous(memory_format=memory_format)
    torch.manual_seed(5)
    y = layer(x)
    assert y.is_contiguous(memory_format=memory_format) == expected, family.name
    check_mask_scale(family, x.detach(), y.detach())
    if family.weights:  # the same masks as from a contiguous input (drawn for the weights)
        torch.manual_seed(5)
        assert torch.allclose(y, layer(x.contiguous()), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_compiles_once_while_p_changes(family: Family) -> None:
    torch._dynamo.reset()
    layer, x = build(family, False)
    x = x.requires_grad_() if x.is_floating_point() else x
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(layer, backend=counter)
    compiled(x).sum().backward()
    frames = counter.frame_count
    assert frames >= 1
    learned = isinstance(layer, ConcreteDropout)  # its p lies strictly between 0 and 1
    for p in (0.1, 0.5, 0.7, 0.2) if learned else (0.1, 0.5, 0.0, 1.0, 0.7):
        cast(DropProbability, layer).p = p
        y = compiled(x)
        y.sum().backward()
        if p in (0.0, 1.0):  # the exact cases, read from the tensor p
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == frames, f"{family.name}: recompiled as p changed"


# ------------------------------------------------------------------ threads


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_threads_share_a_layer(family: Family) -> None:
    layer, x = build(family, True)
    errors: list[BaseException] = []

    def work(mode: str) -> None:
        try:
            for _ in range(3):
                _in_mode(mode, family, layer, x)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(m,)) for m in ("grad", "inference", "grad", "no_grad")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


# ------------------------------------------------------------------ beyond forward


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_drop_path_residual_under_vmap(randomness: str) -> None:
    """The branch on the kept samples only has a data-dependent shape, which vmap cannot
    batch: inside a transform the residual is ``x + drop_path(branch(x))``."""
    layer = DropPath(0.5)
    y = vmap(lambda x: layer.residual(x, lambda h: 2 * h), randomness=randomness)(torch.ones(3, 64, 4))
    assert bool(((y == 1) | (y == 5)).all())  # 1 + 2 / (1 - p) where kept
    assert torch.equal(y[0], y[1]) == (randomness == "same")


def test_unsupported_combinations_name_the_layer() -> None:
    rnn = DropConnect(nn.LSTM(2, 2), names=("weight_hh_l0",))
    with pytest.raises(NotImplementedError, match="DropConnect: .*LSTM"), rnn.independent_groups(2):
        rnn(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="Dropout2d .*ambiguous"):
        vmap(Dropout2d(), randomness="different")(torch.ones(2, 3, 4, 4))


if __name__ == "__main__":
    run_orders(sys.argv[1])
