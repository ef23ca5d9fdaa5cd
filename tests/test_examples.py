"""Every example runs in its fast mode and shows what it claims."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import their shared _fast.py
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    return _load(name, monkeypatch).main(["--fast", "--out", str(tmp_path)])


def test_scheduled_mlp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rates = _run("scheduled_mlp", tmp_path, monkeypatch)
    assert rates["net.drop1"] == 0.5  # the linear ramp is over after half the run
    assert 0.0 < rates["net.drop2"] < 0.5  # the curriculum is still rising


def test_spatial_cnn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = _run("spatial_cnn", tmp_path, monkeypatch)
    for fraction, expected in summary.values():
        assert expected == pytest.approx(0.3)
        assert abs(fraction - expected) < 0.15


def test_dropconnect_gaussian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accuracy = _run("dropconnect_gaussian", tmp_path, monkeypatch)
    assert set(accuracy) == {"mean", "gaussian", "mc masks"}
    # well above chance (0.1); after the 2 epochs of --fast these land between 0.48 and 0.6 by seed
    assert all(value > 0.35 for value in accuracy.values())


def test_ddp_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rates = _run("ddp_cpu", tmp_path, monkeypatch)
    assert set(rates.values()) == {0.5}


def test_every_callback_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_dropout.callbacks import (
        ChannelDropMonitor,
        CoActivationMonitor,
        DropoutScheduler,
        DropRateMonitor,
        MCDropout,
    )

    example = _load("digits_cli", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["digits_cli.py"])
    cli = example.main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "all_callbacks.yaml"),
            "--trainer.max_epochs=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {DropoutScheduler, CoActivationMonitor, ChannelDropMonitor, DropRateMonitor, MCDropout} <= kinds
    assert cli.trainer.global_step > 0
