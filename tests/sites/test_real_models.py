"""Sites on the models users run: tiny random-weight builds of timm, transformers and torch
models, each dropping in its own forms (modules, attention dropout inside
scaled_dot_product_attention, float rates read in forward, nn.LSTM(dropout=), F.dropout)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dropout.mc import mc_dropout, mc_predict
from lightning_dropout.sites import find_sites, set_dropout_p
from tests import _models


class LSTMTagger(nn.Module):
    """A 2-layer LSTM with dropout between its layers, batch-first."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


class FunctionalHead(nn.Module):
    """Dropout only through ``F.dropout`` at a rate of its own, beside BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)
        self.p_hidden = 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(torch.relu(self.norm(self.fc(x))), p=self.p_hidden, training=self.training)
        return self.out(h)


class ResidualStack(nn.Module):
    """Residual blocks with torchvision's StochasticDepth (by its documented interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()) for _ in range(3)
        )
        self.depth = nn.ModuleList(_models.StochasticDepth(0.1 * (i + 1), "row") for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, depth in zip(self.blocks, self.depth, strict=True):
            x = x + depth(block(x))
        return x


@dataclass
class Case:
    """A model, how to feed it, and the sites it must show (name -> kind, a subset)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]
    expected: dict[str, str] = field(default_factory=dict)
    count: int | None = None  # the exact number of sites, where it is known

    def model(self) -> nn.Module:
        """The model as a module from one input tensor to one output tensor."""
        torch.manual_seed(0)
        model = self.build()
        return _models.Logits(model) if hasattr(model, "config") else model


def image(batch: int) -> torch.Tensor:
    return torch.randn(batch, *_models.IMAGE)


def tokens(kind: str) -> Callable[[int], torch.Tensor]:
    return lambda batch: _models.hf_input(kind, batch)


HF_RATES = {
    "bert": {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "gpt2": {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
    "llama": {"attention_dropout": 0.1},  # attention dropout is Llama's only dropout
    "bart": {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1},
    "vit": {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
}
HF_EXPECTED = {
    "bert": {
        "bert.encoder.layer.0.attention.self.dropout": "attention",
        "bert.embeddings.dropout": "dropout",
    },
    "gpt2": {"transformer.h.1.attn.attn_dropout": "attention", "transformer.h.1.mlp.dropout": "dropout"},
    "llama": {
        "model.layers.0.self_attn.attention_dropout": "attention",
        "model.layers.1.self_attn.attention_dropout": "attention",
    },
    "bart": {
        "model.encoder.layers.0.self_attn.dropout": "attention",
        "model.encoder.layers.0.activation_dropout": "dropout",
        "model.decoder.layers.1.dropout": "dropout",
        "model.encoder.layerdrop": "layer_drop",
    },
    "vit": {"vit.layers.0.attention.attention_dropout": "attention", "vit.layers.1.dropout": "dropout"},
}


def hf_case(kind: str, attention: str) -> Case:
    return Case(
        lambda: _models.hf_model(kind, attention, **HF_RATES[kind]),
        image if kind == "vit" else tokens(kind),
        {f"model.{name}": site_kind for name, site_kind in HF_EXPECTED[kind].items()},  # inside Logits
        2 if kind == "llama" else None,
    )


CASES: dict[str, Case] = {
    "timm-vit": Case(
        lambda: _models.timm_vit(drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1),
        image,
        {"blocks.0.attn.attn_drop": "attention", "blocks.1.drop_path1": "drop_path", "head_drop": "dropout"},
    ),
    "timm-vit-unfused": Case(
        lambda: _models.timm_vit(fused_attn=False, attn_drop_rate=0.2),
        image,
        {"blocks.0.attn.attn_drop": "attention"},
    ),
    "timm-resnet": Case(
        lambda: _models.timm_model("test_resnet", drop_rate=0.2, drop_path_rate=0.1),
        image,
        {"drop_rate": "dropout", "layer4.0.drop_path": "drop_path"},
        4,
    ),
    "timm-efficientnet": Case(
        lambda: _models.timm_model("test_efficientnet", drop_rate=0.2, drop_path_rate=0.2),
        image,
        {"drop_rate": "dropout", "blocks.4.0.drop_path": "drop_path"},
        5,
    ),
    **{f"hf-{k}-{a}": hf_case(k, a) for k in HF_RATES for a in ("eager", "sdpa")},
    "lstm": Case(LSTMTagger, lambda batch: torch.randn(batch, 6, 8), {"lstm.dropout": "rnn"}, 1),
    "functional": Case(FunctionalHead, lambda batch: torch.randn(batch, 8), {"p_hidden": "dropout"}, 1),
    "stochastic-depth": Case(ResidualStack, lambda batch: torch.randn(batch, 8), {"depth.2": "drop_path"}, 3),
}
# Attention dropout as the only stochastic site: MC must reach inside the attention.
ATTENTION_ONLY = {
    "bert-attention-only": Case(
        lambda: _models.hf_model("bert", "sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.2),
        tokens("bert"),
    ),
    "gpt2-attention-only": Case(
        lambda: _models.hf_model("gpt2", "sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.2),
        tokens("gpt2"),
    ),
    "timm-vit-attention-only": Case(lambda: _models.timm_vit(attn_drop_rate=0.2), image),
    "llama-sdpa": CASES["hf-llama-sdpa"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_site_is_found_with_its_kind(name: str) -> None:
    case = CASES[name]
    sites = find_sites(case.model())
    found = {site_name: site.kind for site_name, site in sites.items()}
    assert case.expected.items() <= found.items(), found
    if case.count is not None:
        assert len(sites) == case.count, found
    assert all(site.settable for site in sites.values()), found


def forward_twice(case: Case, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two train-mode forwards of one input under different seeds."""
    x = case.inputs(4)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outputs.append(model(x))
    return outputs[0], outputs[1]


@pytest.mark.parametrize("name", list(CASES))
def test_p_zero_at_every_site_makes_a_training_forward_deterministic(name: str) -> None:
    case = CASES[name]
    model = case.model().train()
    first, second = forward_twice(case, model)
    assert not torch.equal(first, second)  # the sites drop
    set_dropout_p(model, 0.0)
    first, second = forward_twice(case, model)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.named_buffers()}


@pytest.mark.parametrize("name", [*CASES, *ATTENTION_ONLY])
def test_mc_predict_samples_every_kind_of_site_and_leaves_batchnorm_alone(name: str) -> None:
    case = CASES.get(name) or ATTENTION_ONLY[name]
    model = case.model().eval()
    before, modes = buffers(model), {n: m.training for n, m in model.named_modules()}
    x = case.inputs(3)
    out = mc_predict(model, x, n_samples=4, output="regression")
    assert out.variance.amax() > 0  # stochastic
    for key, value in buffers(model).items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics bitwise unchanged
    assert {n: m.training for n, m in model.named_modules()} == modes
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # deterministic again


def test_mc_mode_on_attention_only_sdpa_models_reaches_inside_the_attention() -> None:
    case = ATTENTION_ONLY["bert-attention-only"]
    model = case.model().eval()
    x = case.inputs(2)
    with torch.no_grad(), mc_dropout(model):
        attention = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]
        assert attention and all(m.training for m in attention)
        assert not model.model.bert.encoder.layer[0].output.LayerNorm.training
        first, second = model(x), model(x)
    assert not torch.equal(first, second)
    with torch.no_grad(), mc_dropout(model, sites="*embeddings*"):  # only a site at p = 0
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_batched_mc_on_a_transformer_matches_looped_in_distribution() -> None:
    case = ATTENTION_ONLY["llama-sdpa"]
    model = case.model().eval()
    x = case.inputs(2)
    batched = mc_predict(model, x, n_samples=64, batched=True)
    looped = mc_predict(model, x, n_samples=64, batched=False)
    # Means of 64 probability samples: the two estimates differ by noise of sd <= sqrt(2/64)/2.
    assert (batched.mean - looped.mean).abs().max() <= 4 * math.sqrt(2 / 64) / 2
