"""p as a float or a 0-d tensor (layers/common.py): compiled layers pass p_tensor, so a
changing p does not recompile."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lightning_dropout as ld


def test_torch_dropout_recompiles_per_value_under_compile() -> None:
    """The contrast that motivates holding p in a tensor: torch specialises on a float p."""
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    layer = nn.Dropout(0.0)
    compiled = torch.compile(layer, backend=backend)
    for step in range(5):
        layer.p = step / 10
        compiled(torch.ones(3))
    assert backend.frame_count >= 5  # at least one compile per value


def test_compiled_layers_follow_the_new_p_without_recompiling() -> None:
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    layer, channel, gaussian = ld.Dropout(0.0), ld.Dropout2d(0.0), ld.GaussianDropout(0.0)
    compiled = [torch.compile(m, backend=backend) for m in (layer, channel, gaussian)]
    x = torch.ones(40, 50, 5, 5)
    n_elements, n_channels = x.numel(), 40 * 50
    for p in (0.0, 0.25, 0.75, 1.0):
        for m in (layer, channel, gaussian):
            m.p = p
        element, channels, noisy = (c(x) for c in compiled)
        # 5 sigmas of the binomial fraction of dropped elements / channels
        assert abs((element == 0).double().mean().item() - p) <= 5 * (p * (1 - p) / n_elements) ** 0.5
        assert (
            abs((channels[:, :, 0, 0] == 0).double().mean().item() - p)
            <= 5 * (p * (1 - p) / n_channels) ** 0.5
        )
        assert torch.equal(channels == 0, (channels[:, :, :1, :1] == 0).expand_as(channels))
        if p < 1:
            scale = torch.tensor(1 / (1 - p), dtype=x.dtype).item()
            assert set(element.unique().tolist()) <= {0.0, scale}
            # N(1, p / (1 - p)): the sample variance within 5 sigmas (sd of s^2 is ~ var * sqrt(2 / n))
            variance = p / (1 - p)
            assert abs(noisy.var().item() - variance) <= 5 * variance * (2 / n_elements) ** 0.5 + 1e-12
        else:
            assert not element.any() and not channels.any() and not noisy.any()
    assert backend.frame_count == 3  # one graph per layer, reused for every p


def test_p_tensor_mirrors_p_and_stays_out_of_the_state_dict() -> None:
    layer = ld.Dropout(0.3)
    layer.p = 0.7
    assert layer.p_tensor.item() == 0.7 and layer.p == 0.7  # float64: p itself
    assert layer.p_tensor.dtype == torch.float64
    assert list(layer.state_dict()) == [] and [n for n, _ in layer.named_buffers()] == ["p_bits"]
    with pytest.raises(ValueError, match="p must be in"):
        layer.p = 1.5
    assert layer.p_tensor.item() == 0.7
    with torch.inference_mode():
        built_for_inference = ld.Dropout2d(0.1)
    built_for_inference.p = 0.2
    assert built_for_inference.p_tensor.item() == 0.2
    assert [n for n, _ in built_for_inference.named_buffers()] == ["p_bits"]
    assert list(built_for_inference.state_dict()) == []


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_p_tensor_survives_a_dtype_cast_of_the_model(cast: object) -> None:
    """Module.to(dtype) casts floating buffers: a bf16 mirror would read 0.3 as 0.30078."""
    model = nn.Sequential(nn.Linear(3, 3), ld.Dropout(0.3), ld.DropConnectLinear(3, 3, p=0.3))
    cast(model)  # type: ignore[operator]
    assert model[1].p_tensor.item() == 0.3 and model[2].p_tensor.item() == 0.3
    model[1].p = 0.1
    assert model[1].p_tensor.item() == 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_low_precision_layers_drop_at_p_not_at_p_rounded(dtype: torch.dtype) -> None:
    """bf16 random numbers (8 bits) would drop a fraction 0.301 at p = 0.3: 5+ sigmas off here."""
    torch._dynamo.reset()
    n = 4_000_000
    layer = ld.Dropout(0.3).to(dtype)
    out = torch.compile(layer, backend="aot_eager")(torch.ones(n, dtype=dtype))
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 0.3) <= 5 * (0.3 * 0.7 / n) ** 0.5
    assert set(out.unique().tolist()) <= {0.0, torch.tensor(1 / 0.7, dtype=dtype).item()}


def test_compiled_p_one_gives_finite_zero_gradients() -> None:
    layer = ld.Dropout(1.0)
    x = torch.full((4, 3), float("inf"), requires_grad=True)
    out = torch.compile(layer, backend="aot_eager")(x)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(4, 3)) and torch.equal(x.grad, torch.zeros(4, 3))


def test_compiled_variants_match_the_eager_rules() -> None:
    compile_ = torch.compile  # aot_eager: the dynamo path without the cost of inductor
    x = torch.ones(2, 3, 4)
    original = ld.Dropout(0.25, inverted=False)
    out = compile_(original, backend="aot_eager")(x)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    original.eval()
    assert torch.equal(compile_(original, backend="aot_eager")(x), x * 0.75)
    inverted_eval = ld.Dropout(0.25).eval()
    assert torch.equal(compile_(inverted_eval, backend="aot_eager")(x), x)
    unbatched = ld.Dropout2d(0.5, batched=False)  # (C, H, W): one draw per channel
    out = compile_(unbatched, backend="aot_eager")(torch.ones(6, 2, 2))
    assert torch.equal(out == 0, (out[:, :1, :1] == 0).expand_as(out))
    inplace = ld.Dropout(0.5, inplace=True)
    y = torch.ones(50)
    out = compile_(inplace, backend="aot_eager")(y)
    assert torch.equal(out, y) and set(y.unique().tolist()) == {0.0, 2.0}
    with pytest.raises(ValueError, match="ambiguous"):
        compile_(ld.Dropout2d(0.5), backend="aot_eager")(torch.ones(2, 3, 4))


def test_compiled_drop_connect_layers_follow_the_new_p_without_recompiling() -> None:
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    linear = ld.DropConnectLinear(200, 50, bias=False, p=0.0)
    conv = ld.DropConnectConv2d(4, 8, 3, bias=False, p=0.0)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        conv.weight.fill_(1.0)
    compiled_linear = torch.compile(linear, backend=backend)
    compiled_conv = torch.compile(conv, backend=backend)
    x = torch.eye(200)  # row i of the output is column i of the masked weight
    for p in (0.0, 0.3, 0.6, 1.0):
        linear.p = conv.p = p
        weight = compiled_linear(x).T  # (50, 200): the masked, scaled weight
        n = weight.numel()
        assert abs((weight == 0).double().mean().item() - p) <= 5 * (p * (1 - p) / n) ** 0.5
        if p < 1:
            kept = weight[weight != 0]
            torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
        assert compiled_conv(torch.ones(2, 4, 5, 5)).shape == (2, 8, 3, 3)
    linear.eval()
    assert torch.equal(compiled_linear(x), linear.weight.T.detach())  # plain weights at eval
    assert backend.frame_count <= 3  # train graphs of both layers (+ the eval one), reused for every p
