"""The MC calibration and OOD example runs in fast mode and prints both tables."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_mc_ood_example_measures_calibration_and_detection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the example imports the shared _fast.py
    spec = importlib.util.spec_from_file_location("example_mc_ood", EXAMPLES / "mc_ood.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--fast", "--out", str(tmp_path)])
    calibration = results["calibration"]
    for which in ("mc", "det"):
        assert calibration[f"test/{which}/accuracy"] > 0.6  # chance is 0.1
        assert all(math.isfinite(calibration[f"test/{which}/{m}"]) for m in ("nll", "brier", "ece"))
    assert results["uniform noise"]["mc/ood_auroc_entropy"] > 0.8
    for name in ("uniform noise", "inverted digits", "rotated 90 deg"):
        assert set(results[name]) == {
            "mc/ood_auroc_entropy",
            "mc/ood_auroc_bald",
            "mc/ood_fpr95_entropy",
            "det/ood_auroc_entropy",
        }
    out = capsys.readouterr().out
    assert "Out-of-distribution detection" in out and "FPR95 MC entropy" in out
    assert (tmp_path / "mc_ood" / "fit").is_dir() and (tmp_path / "mc_ood" / "test_uniform_noise").is_dir()
