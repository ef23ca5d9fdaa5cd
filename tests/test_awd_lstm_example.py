"""The AWD-LSTM example runs in fast mode: it learns, and its monitored rates follow p."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_awd_lstm_learns_and_its_rates_follow_p(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the example imports the shared _fast.py
    spec = importlib.util.spec_from_file_location("awd_lstm", EXAMPLES / "awd_lstm.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--fast", "--out", str(tmp_path)])
    assert summary["test/accuracy"] > 0.3 and summary["mc/accuracy"] > 0.3  # chance is 0.1
    assert summary["embed/p"] == pytest.approx(0.1)
    for site in ("input_drop", "output_drop"):  # ramped from 0 to 0.3 over half the run
        assert 0.0 < summary[f"{site}/p"] < 0.3
        assert abs(summary[f"{site}/realised"] - summary[f"{site}/p"]) < 0.05
    assert 0.0 <= summary["embed/realised"] < 0.5
    assert math.isfinite(summary["entropy/right"])
