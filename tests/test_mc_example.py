"""The MC uncertainty example runs in fast mode and shows higher entropy out of distribution."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "mc_uncertainty.py"


def test_ood_inputs_have_higher_predictive_entropy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("mc_uncertainty", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--fast", "--out", str(tmp_path)])
    in_dist = results.pop("in-distribution (held-out digits)")
    assert in_dist["accuracy"] > 0.8
    for name in ("OOD: uniform noise", "OOD: inverted digits"):
        assert results[name]["entropy"] > 2 * in_dist["entropy"], name
        assert results[name]["mutual_information"] > 2 * in_dist["mutual_information"], name
    assert "OOD entropy / in-distribution entropy" in capsys.readouterr().out
