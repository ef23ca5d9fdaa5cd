"""The prepared GPU script, run on the CPU interpreter: a GPU session must not be spent on
a script that fails. Its numbers here mean nothing; its checks must all pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_run_passes_every_check(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    failed = [title for title, value in results.items() if isinstance(value, str)]  # tracebacks
    assert not failed, {title: results[title] for title in failed}
    assert results["environment"]["smoke (CPU interpreter, not a measurement)"] is True
    summary = results["correctness summary"]
    assert summary["cases"] >= 20 and all(v for k, v in summary.items() if k != "cases")
    assert results["saved bytes per element"]["ours dropout"] < 0.01
    compiled = results["compile and checkpoint"]
    assert compiled["no recompile when p changes"]
    assert compiled["checkpoint recomputation gives the same gradient"]
    assert compiled["rank streams: a rank's mask reproduces"]
    assert 0.4 < compiled["rank streams: masks of two ranks agree on a fraction (about 0.5)"] < 0.6
    assert len(compiled["compiled layers: custom ops in their graphs"]) == 3
    assert compiled["compiled layers: graphs for 3 layers x 5 values of p"] == 3
    assert compiled["compiled layers: output equals the regenerated gradient factor"]
    assert "ratio ours / plain (target <= 8)" in results["per-sample DropConnect"]
    assert (tmp_path / "gpu.md").read_text().startswith("# GPU check of the Triton kernels")
