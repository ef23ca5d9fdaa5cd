"""examples/active_mnist.py runs in its fast mode and reports every method."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "active_mnist.py"


@pytest.mark.filterwarnings("ignore")
def test_active_mnist_fast(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("example_active_mnist", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--fast", "--out", str(tmp_path)])
    assert set(result["methods"]) == {"bald", "max_entropy", "random"}
    for numbers in result["methods"].values():
        assert numbers["labelled"] == [20.0, 30.0, 40.0]
        assert 0.0 < numbers["area"] <= 1.0
    assert (tmp_path / "active_mnist.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["config"]["rounds"] == 2
