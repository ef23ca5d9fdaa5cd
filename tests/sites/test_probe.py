"""FunctionalProbe: functional dropout calls attributed to their sites, only while open."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from lightning_dropout.sites import FunctionalProbe, find_sites
from lightning_dropout.sites.probe import attention_in_math_form


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.2)  # a module: its own F.dropout call is not this layer's
        self.dropout = 0.1
        self.activation_dropout = 0.3
        self.residual_dropout = 0.1  # the same rate as `dropout`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.drop(self.fc(x)), p=self.dropout, training=self.training)
        x = F.dropout(x, p=self.activation_dropout, training=self.training)
        x = F.dropout(x, p=self.residual_dropout, training=self.training)
        return F.dropout(x, p=self.dropout, training=False)  # not dropping: not seen


def observed(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    seen: list[tuple[str, tuple[int, ...]]] = []
    with FunctionalProbe(find_sites(model), lambda site, inp: seen.append((site.name, tuple(inp.shape)))):
        model(x)
    return seen


def test_calls_are_attributed_by_module_and_rate() -> None:
    seen = observed(nn.Sequential(Layer()), torch.randn(2, 4))
    # Equal rates share an observation; the nn.Dropout module's own call is not the layer's.
    assert seen == [
        ("0.dropout", (2, 4)),
        ("0.residual_dropout", (2, 4)),
        ("0.activation_dropout", (2, 4)),
        ("0.dropout", (2, 4)),
        ("0.residual_dropout", (2, 4)),
    ]
    assert observed(nn.Sequential(Layer()).eval(), torch.randn(2, 4)) == []


def test_the_output_is_unchanged_and_nothing_stays_installed() -> None:
    model = nn.Sequential(Layer())
    x = torch.randn(3, 4)
    torch.manual_seed(5)
    expected = model(x)
    torch.manual_seed(5)
    finished: list[torch.Tensor] = []
    with FunctionalProbe(find_sites(model), lambda site, inp: finished.append):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(finished) == 5  # every observer's finish saw an output
    probe = FunctionalProbe(find_sites(model), lambda site, inp: None)
    with pytest.raises(RuntimeError, match="boom"), probe:
        raise RuntimeError("boom")
    assert not _get_current_function_mode_stack()
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    probe.remove()  # idempotent


ATTENTION_FORMS = {
    "plain": ((), {}),
    "causal": ((), {"is_causal": True}),
    "scale": ((), {"scale": 0.3}),
    "bool mask, one row fully masked": ((), {"attn_mask": "bool"}),
    "float mask": ((), {"attn_mask": "float"}),
    "grouped heads": ((), {"enable_gqa": True}),
    "positional": ((None, 0.0, True), {}),
}


@pytest.mark.parametrize("form", list(ATTENTION_FORMS))
def test_attention_in_math_form_matches_the_fused_kernel_values_and_gradients(form: str) -> None:
    extra, kwargs = ATTENTION_FORMS[form]
    generator = torch.Generator().manual_seed(0)
    shape = (2, 4, 5, 8)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    if kwargs.get("enable_gqa"):
        k, v = k[:, :2], v[:, :2]
    if kwargs.get("attn_mask") == "bool":
        mask = torch.rand(2, 1, 5, 5, generator=generator) > 0.3
        mask[0, 0, 1] = False  # a query that may attend to nothing: zeros, as the kernels give
        kwargs = {"attn_mask": mask}
    elif kwargs.get("attn_mask") == "float":
        kwargs = {"attn_mask": torch.randn(2, 1, 5, 5, generator=generator, dtype=torch.float64)}
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    fused = F.scaled_dot_product_attention(*inputs, *extra, **kwargs)
    fused_grads = torch.autograd.grad(fused.sum(), inputs)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    math_form = attention_in_math_form((*inputs, *extra), kwargs, lambda probs: probs)
    math_grads = torch.autograd.grad(math_form.sum(), inputs)
    torch.testing.assert_close(math_form, fused)
    for got, expected in zip(math_grads, fused_grads, strict=True):
        torch.testing.assert_close(got, expected)
        assert got.isfinite().all()


class Attention(nn.Module):
    """Attention dropout inside scaled_dot_product_attention at a rate of its own."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.attention_dropout = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        p = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)


def test_attention_dropout_inside_sdpa_is_observed_in_math_form_with_the_same_p() -> None:
    model = Attention(0.3)
    q = torch.randn(4, 2, 16, 8)
    counts: list[tuple[int, int]] = []

    def observe(site: object, probs: torch.Tensor) -> object:
        return lambda out: counts.append((int(out.eq(0).sum()), probs.numel()))

    with FunctionalProbe(find_sites(model), observe):  # type: ignore[arg-type]
        out = model(q)
    ((dropped, total),) = counts
    assert total == 4 * 2 * 16 * 16  # the attention probabilities
    sigma = (0.3 * 0.7 / total) ** 0.5
    assert abs(dropped / total - 0.3) <= 5 * sigma
    assert out.shape == q.shape
    with FunctionalProbe(find_sites(model.eval()), observe):  # type: ignore[arg-type]
        model(q)  # p = 0: the fused kernel runs, nothing to observe
    assert len(counts) == 1
