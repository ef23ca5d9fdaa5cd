"""Sites in peft LoRA models: one site per adapter's ``lora_dropout`` beside the base
model's own, none from peft's code calling a module through a local name
(``dropout = self.lora_dropout[name]; dropout(x)``), and LoRA dropout scheduled per layer,
observed and sampled like any other site."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_dropout.callbacks import DropoutScheduler, DropRateMonitor
from lightning_dropout.mc import mc_predict
from lightning_dropout.schedules import Constant, Linear
from lightning_dropout.sites import find_sites
from lightning_dropout.sites.code import class_code
from tests import _models
from tests._loggers import MemoryLogger
from tests.callbacks.test_sites_in_fit import Wrapped, assert_near, fit, realised, token_batches

peft = pytest.importorskip("peft", reason="peft is in the dev extra")

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
BASE_RATES = {
    "bert": {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "llama": {"attention_dropout": 0.1},
}


def lora(kind: str, lora_dropout: float = 0.1, adapters: tuple[str, ...] = ("default",)) -> nn.Module:
    """A tiny random-weight transformers model with LoRA adapters on two projections."""
    torch.manual_seed(0)
    base = _models.hf_model(kind, "sdpa", **BASE_RATES[kind])
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=TARGETS[kind])
    model = peft.get_peft_model(base, config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    return model


def base_sites(kind: str) -> dict[str, str]:
    torch.manual_seed(0)
    return {
        name: s.kind for name, s in find_sites(_models.hf_model(kind, "sdpa", **BASE_RATES[kind])).items()
    }


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("adapters", [("default",), ("default", "second")])
def test_one_site_per_adapter_beside_the_base_models_own(kind: str, adapters: tuple[str, ...]) -> None:
    sites = find_sites(lora(kind, adapters=adapters))
    found = {name: site.kind for name, site in sites.items()}
    own = {f"base_model.model.{name}": site_kind for name, site_kind in base_sites(kind).items()}
    assert own.items() <= found.items(), found
    lora_sites = {name for name in found if name not in own}
    layers = {name.rsplit(".lora_dropout.", 1)[0] for name in lora_sites}
    assert len(layers) == 2 * len(TARGETS[kind])  # two layers, two projections each
    assert lora_sites == {f"{layer}.lora_dropout.{adapter}" for layer in layers for adapter in adapters}
    assert all(sites[name].kind == "dropout" and sites[name].p == 0.1 for name in lora_sites)
    assert all(site.settable for site in sites.values())  # no "rate written in code" site


def test_a_module_called_through_a_local_name_is_not_a_dropout_function() -> None:
    class Adapter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lora_dropout = nn.ModuleDict({"a": nn.Dropout(0.1)})

        def forward(self, x: torch.Tensor, drop_fn: nn.Module | None = None) -> torch.Tensor:
            dropout = self.lora_dropout["a"]
            x = dropout(x)
            for dropout in self.lora_dropout.values():
                x = dropout(x)
            if drop_fn is not None:
                x = drop_fn(x)
            return x

    class Functional(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dropout = torch.nn.functional.dropout
            return dropout(x, 0.3)

    assert class_code(Adapter).uses == ()
    assert find_sites(Adapter()).keys() == {"lora_dropout.a"}
    (use,) = class_code(Functional).uses  # a local bound to the function still drops
    assert (use.function, use.written_p) == ("dropout", 0.3)


def test_lora_dropout_scheduled_per_layer_and_observed_in_a_fit(tmp_path: Path) -> None:
    # peft builds nn.Identity for lora_dropout=0: any rate > 0 makes the sites to schedule.
    model = Wrapped(_models.Logits(lora("bert", lora_dropout=0.1)))
    scheduler = DropoutScheduler(
        {
            "*layer.0.*lora_dropout*": Constant(0.2),
            "*layer.1.*lora_dropout*": Linear(0.0, 0.4, steps=2),
        }
    )
    logger = MemoryLogger()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DropoutScheduler cannot set")
        fit(
            tmp_path,
            model,
            token_batches("bert", (12, 12, 12)),
            [scheduler, DropRateMonitor(every_n_steps=1)],
            logger=logger,
        )
    assert set(scheduler.site_controls().values()) == set()  # groups are released after fit
    for step, rates in enumerate(model.seen):
        for name, p in rates.items():
            if ".lora_dropout." in name:
                expected = 0.2 if ".layer.0." in name else Linear(0.0, 0.4, steps=2)(step)
                assert p == pytest.approx(expected), (step, name)
            else:
                assert p == pytest.approx(0.1), name  # the base model's own rates stay
    query = "net.model.base_model.model.bert.encoder.layer.0.attention.self.query.lora_dropout.default"
    assert_near(realised(logger, query), 0.2, 4 * 12 * 32)


def test_mc_predict_samples_lora_dropout_alone() -> None:
    torch.manual_seed(0)
    base = _models.hf_model("bert", "sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = peft.LoraConfig(r=4, lora_dropout=0.3, target_modules=TARGETS["bert"], init_lora_weights=False)
    model = _models.Logits(peft.get_peft_model(base, config)).eval()
    x = _models.hf_input("bert", 3)
    out = mc_predict(model, x, n_samples=4, output="regression")
    assert out.variance.amax() > 0  # only the adapters drop
    out = mc_predict(model, x, n_samples=4, output="regression", sites="*embeddings*")
    assert out.variance.amax() == 0
    assert not model.training
