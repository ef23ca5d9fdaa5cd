"""Tiny random-weight builds of the models users run: timm, transformers, torch's own.

Nothing is downloaded: every model is built from a config with random weights, small
enough that a forward takes milliseconds.

timm imports torchvision at import time (``FrozenBatchNorm2d``, its data transforms), and
the registry's torchvision is a CUDA build that fails to import beside the CPU torch (and
then breaks ``import lightning``). So the project's environment has no torchvision, and
:func:`import_timm` imports timm with a stand-in ``torchvision`` whose names are
placeholders that raise when used. The stand-in exists only during ``import timm``; timm's
model code never touches those names. With a real torchvision installed, timm imports as
usual.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import lightning  # noqa: F401  (first: torchmetrics must see no torchvision)
import pytest
import torch
from torch import nn

from lightning_dropout import DropConnect, DropConnectConv2d, DropConnectLinear, Dropout2d


class _Placeholder(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"torchvision is not installed: {cls.__name__} is a placeholder")


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandInTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


@contextlib.contextmanager
def _stand_in_torchvision() -> Iterator[None]:
    finder = _StandInTorchvision()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def import_timm() -> types.ModuleType:
    """timm, imported with a stand-in torchvision when the real one is missing or broken;
    skips the test when timm is not installed."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    try:
        import torchvision  # noqa: F401
    except Exception:
        with _stand_in_torchvision():
            import timm
    else:
        import timm
    return timm


def transformers() -> types.ModuleType:
    """transformers, or a skip when it is not installed."""
    return pytest.importorskip("transformers")


IMAGE = (3, 32, 32)


def timm_vit(fused_attn: bool = True, **rates: float) -> nn.Module:
    """A 2-block ViT (dim 32, 2 heads, 16 patches of 8x8) with the given rates."""
    timm = import_timm()
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
        **rates,
    )
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attn
    return model


def timm_model(name: str, **rates: float) -> nn.Module:
    """One of timm's test-sized models (``"test_resnet"``, ``"test_efficientnet"``)."""
    return import_timm().create_model(name, pretrained=False, num_classes=10, **rates)


SEQUENCE = 12
VOCAB = 64


def hf_model(kind: str, attn_implementation: str = "sdpa", **rates: float) -> nn.Module:
    """A 2-layer, width-32 transformers model with random weights.

    ``kind``: ``"bert"`` (sequence classification), ``"gpt2"``, ``"llama"`` (causal LM),
    ``"bart"`` (sequence classification) or ``"vit"`` (image classification).
    """
    hf = transformers()
    small = {"vocab_size": VOCAB, "max_position_embeddings": 64}
    if kind == "bert":
        config = hf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **small, **rates
        )
        model = hf.BertForSequenceClassification(config)
    elif kind == "gpt2":
        config = hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=VOCAB, **rates)
        model = hf.GPT2LMHeadModel(config)
    elif kind == "llama":
        config = hf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            **small,
            **rates,
        )
        model = hf.LlamaForCausalLM(config)
    elif kind == "bart":
        config = hf.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            **small,
            **rates,
        )
        model = hf.BartForSequenceClassification(config)
    elif kind == "vit":
        config = hf.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=10,
            **rates,
        )
        model = hf.ViTForImageClassification(config)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    model.config._attn_implementation = attn_implementation
    model.set_attn_implementation(attn_implementation)
    return model


def hf_input(kind: str, batch: int = 4, sequence: int = SEQUENCE) -> torch.Tensor:
    """An input batch for :func:`hf_model`: token ids, or images for ``"vit"``."""
    if kind == "vit":
        return torch.randn(batch, *IMAGE)
    ids = torch.randint(3, VOCAB, (batch, sequence))
    if kind == "bart":
        ids[:, -1] = 2  # BART's classification head reads the final </s> token
    return ids


def hf_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output tensor for ``x`` (image or token ids)."""
    if x.is_floating_point():
        return model(pixel_values=x).logits
    return model(input_ids=x).logits


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision's ``torchvision.ops.stochastic_depth``, by its documented behaviour."""
    if not training or p == 0.0:
        return input
    survival = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return input * noise


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth(p, mode)``, by its documented interface, under its
    qualified name (``torchvision.ops.stochastic_depth.StochasticDepth``): the real one
    cannot be imported beside the CPU torch here."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


StochasticDepth.__module__ = "torchvision.ops.stochastic_depth"


class Logits(nn.Module):
    """A transformers model as a module mapping one input tensor to its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hf_logits(self.model, x)


def conv_net() -> nn.Module:
    """A small CNN with every kind of this package's and torch's dropout layer, and BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Dropout2d(0.3),
        DropConnectConv2d(4, 4, 3, padding=1, p=0.3),
        nn.Flatten(),
        nn.Dropout(0.2),
        DropConnectLinear(4 * 25, 8, p=0.3),
        nn.BatchNorm1d(8),
        DropConnect(nn.Linear(8, 3), p=0.2),
        nn.AlphaDropout(0.1),
    )
