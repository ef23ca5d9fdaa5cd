"""Consistent MC masks: one fixed sub-network per replica, for every kind of site."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dropout import (
    DropConnect,
    DropConnectConv2d,
    DropConnectLinear,
    Dropout,
    Dropout2d,
    GaussianDropout,
)
from lightning_dropout.consistent_masks import ConsistentMasks, inconsistent_sites
from lightning_dropout.mc import MCOutput, mc_predict
from lightning_dropout.sites import find_sites
from tests._models import IMAGE, Logits, hf_input, hf_model, timm_vit


class CodeDropout(nn.Module):
    """Dropout done by the module's code with a rate attribute (timm's heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_rate = 0.4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), p=self.drop_rate, training=self.training)


class Attention(nn.Module):
    """Attention dropout handed to scaled_dot_product_attention (BERT, GPT-2, timm's ViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 48)
        self.attention_dropout = 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2 heads, 4 tokens of width 2 each.
        q, k, v = self.qkv(x).reshape(x.shape[0], 3, 2, 4, 2).unbind(1)
        p = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p).flatten(1)


class Reused(nn.Module):
    """One dropout module called twice in a forward: two independent masks."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.drop(x), self.drop(x)], -1)


def head(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), *layers)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "nn.Dropout": lambda: head(nn.Dropout(0.5)),
    "Dropout(inverted=False)": lambda: head(Dropout(0.5, inverted=False)),
    "Dropout2d": lambda: nn.Sequential(
        nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 4, 1), Dropout2d(0.5), nn.Flatten()
    ),
    "nn.Dropout1d": lambda: nn.Sequential(nn.Unflatten(1, (2, 4)), nn.Dropout1d(0.5), nn.Flatten()),
    "GaussianDropout": lambda: head(GaussianDropout(0.3)),
    "nn.AlphaDropout": lambda: head(nn.SELU(), nn.AlphaDropout(0.3)),
    "DropConnectLinear(per_sample)": lambda: head(DropConnectLinear(32, 16, p=0.4, per_sample=True)),
    "DropConnectConv2d": lambda: nn.Sequential(nn.Unflatten(1, (2, 2, 2)), DropConnectConv2d(2, 4, 1, p=0.4)),
    "DropConnect(Linear)": lambda: head(DropConnect(nn.Linear(32, 16), p=0.4)),
    "F.dropout in code": CodeDropout,
    "scaled_dot_product_attention": Attention,
    "one module called twice": Reused,
}


def samples(model: nn.Module, x: torch.Tensor, seed: int = 7, **kwargs: object) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no site may be reported as inconsistent
        out = mc_predict(
            model, x, 6, consistent=True, seed=seed, return_samples=True, output="regression", **kwargs
        )
    assert isinstance(out, MCOutput) and out.samples is not None
    return out.samples


@pytest.mark.parametrize("name", list(MODELS))
def test_each_replica_applies_one_sub_network_to_every_input(name: str) -> None:
    model = MODELS[name]().eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    first = samples(model, x[:3])  # replicas x rows x outputs
    # The same inputs in another batch, another order, another size, looped: same outputs.
    second = samples(model, x[[4, 2, 1]], batched=False)
    torch.testing.assert_close(second[:, 1:], first[:, [2, 1]])
    alone = samples(model, x[1:2], chunk_size=4)
    torch.testing.assert_close(alone[:, 0], first[:, 1])
    # Replicas are different sub-networks, and another seed gives other ones.
    assert not torch.allclose(first[0], first[1])
    assert not torch.allclose(samples(model, x[:3], seed=8), first)
    assert not model.training


def test_the_mask_is_shared_by_the_rows_of_a_batch() -> None:
    model = head(nn.Dropout(0.5)).eval()
    ones = torch.ones(4, 8)
    dropped = samples(model[1:], model[0](ones)) == 0  # identical rows in, identical masks out
    assert (dropped == dropped[:, :1]).all() and dropped.any()


def test_a_module_called_twice_draws_two_masks() -> None:
    out = samples(Reused().eval(), torch.ones(2, 8))
    assert not torch.equal(out[..., :8] == 0, out[..., 8:] == 0)


def test_the_global_random_stream_is_untouched() -> None:
    model, x = head(nn.Dropout(0.5), DropConnectLinear(32, 4)).eval(), torch.randn(2, 8)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    samples(model, x)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("build", "x"),
    [
        (lambda: timm_vit(drop_rate=0.2, attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.2), IMAGE),
        (lambda: Logits(hf_model("bert", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)), "bert"),
    ],
    ids=["timm-vit", "hf-bert-sdpa"],
)
def test_real_models_are_consistent_at_every_site(build: Callable[[], nn.Module], x: object) -> None:
    torch.manual_seed(0)
    model = build().eval()
    inputs = torch.randn(3, *x) if isinstance(x, tuple) else hf_input(str(x), batch=3)
    first = samples(model, inputs)
    torch.testing.assert_close(samples(model, inputs[[2, 0]], batched=False)[:, 1], first[:, 0])
    assert not torch.allclose(first[0], first[1])


class Noisy(nn.Module):
    """Random code the package does not know as a dropout site."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) + 0.1 * torch.randn_like(x)


def test_sites_that_cannot_be_consistent_are_named_and_stray_draws_reported() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 8, num_layers=2, dropout=0.3, batch_first=True)
            self.attention = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lstm(x)[0]
            return self.attention(h, h, h)[0][:, -1]

    model = Recurrent().eval()
    assert set(inconsistent_sites(find_sites(model))) == {"lstm.dropout", "attention.dropout"}
    with pytest.warns(
        UserWarning, match=r"lstm.dropout \(drawn inside the fused RNN kernel\).*attention.dropout"
    ):
        mc_predict(model, torch.randn(2, 5, 8), 3, consistent=True, seed=0, output="regression")
    with pytest.warns(UserWarning, match="drew random numbers outside the consistent masks"):
        mc_predict(Noisy().eval(), torch.randn(2, 8), 3, consistent=True, seed=0, output="regression")


def test_replicas_must_be_stacked_along_dim_0() -> None:
    model = head(nn.Dropout(0.5)).train()
    masks = ConsistentMasks(model, find_sites(model), seed=0)
    with masks, masks.replicas(0, 3), pytest.raises(ValueError, match="not a multiple of the 3 replicas"):
        model(torch.randn(4, 8))
    with pytest.raises(ValueError, match="count >= 1"), masks.replicas(0, 0):
        pass
    with pytest.raises(TypeError, match="seed"):
        ConsistentMasks(model, {}, seed=1.5)  # type: ignore[arg-type]
    assert "forward" not in vars(model[1])  # the replacement forward is gone on exit


@pytest.mark.parametrize(
    "options",
    [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "float"}, {"enable_gqa": True}],
    ids=["plain", "causal", "scale", "bool-mask", "float-mask", "gqa"],
)
def test_attention_in_math_form_matches_torch(options: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    heads = 2 if options.get("enable_gqa") else 4
    k, v = torch.randn(2, heads, 6, 8, generator=g), torch.randn(2, heads, 6, 8, generator=g)
    kwargs = {key: value for key, value in options.items() if key != "mask"}
    if options.get("mask") == "bool":
        kwargs["attn_mask"] = torch.rand(5, 6, generator=g) > 0.3
        kwargs["attn_mask"][:, 0] = True  # no row masked entirely
    elif options.get("mask") == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 6, generator=g)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    model = nn.Identity()
    masks = ConsistentMasks(model, {}, seed=0)
    with masks.replicas(0, 1):
        # p so small that nothing drops: only the math form is compared.
        got = masks.attention_call((q, k, v), {**kwargs, "dropout_p": 1e-9})
    torch.testing.assert_close(got, expected)


def test_a_forward_replaced_by_someone_else_is_named_not_replaced_again() -> None:
    model = head(nn.Dropout(0.5)).train()
    theirs = model[1].forward
    model[1].forward = theirs  # an instance attribute, as a patching library leaves it
    masks = ConsistentMasks(model, find_sites(model), seed=0)
    with masks:
        assert masks.inconsistent == {"1": "its forward is replaced on the instance"}
        assert vars(model[1])["forward"] is theirs
    assert vars(model[1])["forward"] is theirs
