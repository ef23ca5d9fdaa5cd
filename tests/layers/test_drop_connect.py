"""The DropConnect wrapper: any module's named weights, gradients, state_dict, RNNs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dropout import DropConnect


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("module", "names", "x"),
    [
        (nn.Linear(6, 4), ("weight",), torch.randn(3, 6)),
        (nn.Conv2d(2, 3, 3), ("weight",), torch.randn(2, 2, 5, 5)),
        (nn.LSTM(4, 5, num_layers=2), ("weight_hh_l0", "weight_hh_l1"), torch.randn(7, 2, 4)),
        (nn.GRU(4, 5, batch_first=True), ("weight_hh_l0",), torch.randn(2, 7, 4)),
        (nn.RNN(4, 5), ("weight_ih_l0",), torch.randn(7, 2, 4)),
    ],
    ids=["linear", "conv2d", "lstm", "gru", "rnn"],
)
def test_gradients_reach_the_real_parameters(
    module: nn.Module, names: tuple[str, ...], x: torch.Tensor
) -> None:
    count = _n_params(module)
    wrapped = DropConnect(module, p=0.5, names=names)
    assert _n_params(wrapped) == count
    out = wrapped(x)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    for name in names:
        param = dict(module.named_parameters())[name]
        assert isinstance(param, nn.Parameter)
        assert param.grad is not None and bool(param.grad.ne(0).any())
        # Dropped weights get exactly zero gradient in a one-mask forward.
        assert bool(param.grad.eq(0).any())


def test_mask_differs_between_calls_and_eval_is_the_plain_module() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    wrapped = DropConnect(linear, p=0.5)
    x = torch.randn(4, 8)
    assert not torch.equal(wrapped(x), wrapped(x))
    wrapped.eval()
    assert torch.equal(wrapped(x), linear(x))
    wrapped.train()
    wrapped.p = 0.0
    assert torch.equal(wrapped(x), linear(x))


def test_unbiased_and_scaled() -> None:
    linear = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    wrapped = DropConnect(linear, p=0.75)
    out = wrapped(torch.eye(3))
    assert set(out.unique().tolist()) <= {0.0, 4.0}


def test_state_dict_keeps_the_wrapped_modules_keys_both_ways() -> None:
    plain = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 3))
    wrapped = nn.Sequential(nn.Linear(4, 4), DropConnect(nn.LSTM(4, 3), names=("weight_hh_l0",)))
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())
    assert torch.equal(wrapped[1].module.weight_hh_l0, plain[1].weight_hh_l0)
    plain.load_state_dict(wrapped.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapped.load_state_dict({"0.weight": torch.zeros(4, 4)})


def test_mask_groups_for_batch_first_modules_and_refusal_for_rnns() -> None:
    wrapped = DropConnect(nn.Linear(8, 16), p=0.5)
    wrapped.mask_groups = 2
    y = wrapped(torch.randn(1, 8).expand(4, 8))
    assert torch.allclose(y[0], y[1], rtol=1e-5, atol=1e-6)  # up to rounding across matmul rows
    assert not torch.allclose(y[0], y[2], rtol=1e-3)
    rnn = DropConnect(nn.LSTM(2, 2), names=("weight_hh_l0",))
    rnn.mask_groups = 2
    with pytest.raises(NotImplementedError, match="batched=False"):
        rnn(torch.randn(3, 2, 2))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\['weight_hh'\] are not parameters of LSTM; it has"):
        DropConnect(nn.LSTM(2, 2), names=("weight_hh",))
    with pytest.raises(TypeError, match="names must be a sequence"):
        DropConnect(nn.Linear(2, 2), names="weight")
    with pytest.raises(ValueError, match="at least one"):
        DropConnect(nn.Linear(2, 2), names=())
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        DropConnect("linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p must be in"):
        DropConnect(nn.Linear(2, 2), p=-1)


def test_repr() -> None:
    assert "p=0.3, names=['weight']" in repr(DropConnect(nn.Linear(2, 2), p=0.3))


def test_compiled_wrapper_follows_the_new_p_without_recompiling() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    wrapped = DropConnect(nn.Linear(200, 50, bias=False), p=0.0)
    with torch.no_grad():
        wrapped.module.weight.fill_(1.0)
    compiled = torch.compile(wrapped, backend=backend)
    frames = []
    for p in (0.0, 0.3, 1.0):
        wrapped.p = p
        weight = compiled(torch.eye(200)).T  # the masked, scaled weight
        n = weight.numel()
        # 5 sigmas of the binomial fraction of dropped weights
        assert abs((weight == 0).double().mean().item() - p) <= 5 * (p * (1 - p) / n) ** 0.5
        frames.append(backend.frame_count)
    assert frames == frames[:1] * 3  # graphs of the first p, reused for every p
