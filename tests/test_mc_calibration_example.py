"""The calibration example runs in fast mode, tempers, and its sets cover."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_mc_calibration_example_tempers_and_covers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the example imports the shared _fast.py
    spec = importlib.util.spec_from_file_location("example_mc_calibration", EXAMPLES / "mc_calibration.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--fast", "--out", str(tmp_path)])
    mean = results["mean"]
    assert mean["mc/accuracy"] > 0.6  # chance is 0.1
    # Fitted on the calibration digits, the temperature does not raise the test NLL much.
    assert mean["mc_ts/nll"] <= mean["mc/nll"] + 0.05 and mean["det_ts/nll"] <= mean["det/nll"] + 0.05
    for alpha in (0.05, 0.1, 0.2):
        for method in ("aps", "raps", "lac"):
            # 1,000 calibration and 1,000 test digits: sigma = sqrt(alpha (1 - alpha) 2 / 1000).
            sigma = math.sqrt(alpha * (1 - alpha) * 2 / 1000)
            assert mean[f"{method}/{alpha}/coverage"] >= 1 - alpha - 3 * sigma
    saved = json.loads((tmp_path / "mc_calibration" / "results.json").read_text())
    assert saved["mean"] == pytest.approx(mean)
