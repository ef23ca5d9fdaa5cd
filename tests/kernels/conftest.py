"""Fixtures of the Triton kernel tests, which run in Triton's interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def kernels_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the layers to the Triton kernels for CPU tensors, as they are routed on CUDA."""
    pytest.importorskip("triton")
    from lightning_dropout import kernels
    from lightning_dropout.kernels import triton_dropconnect, triton_dropout

    monkeypatch.setattr(kernels, "triton_kernels", triton_dropout)
    monkeypatch.setattr(kernels, "triton_drop_connect", triton_dropconnect)
    monkeypatch.setattr(kernels, "TRITON_DEVICES", ("cuda", "cpu"))


class RecordingBackend:
    """A torch.compile backend (aot_eager) that counts graphs and records their ops."""

    def __init__(self) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.ops: list[str] = []
        self.graphs = 0
        self._compile = lookup_backend("aot_eager")

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        self.graphs += 1
        self.ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return self._compile(graph, inputs)


@pytest.fixture
def recording_backend() -> RecordingBackend:
    torch._dynamo.reset()
    return RecordingBackend()
