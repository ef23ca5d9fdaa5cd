"""The LightningCLI example configures DropoutScheduler and its schedules from YAML and runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dropout.callbacks import DropoutScheduler
from lightning_dropout.schedules import Chain, Constant, Cosine, EarlyDropout

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_yaml_example_runs_and_schedules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["scheduler_cli.py"])  # pytest's own flags are not the CLI's
    spec = importlib.util.spec_from_file_location("scheduler_cli", EXAMPLES / "scheduler_cli.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    cli = example.main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "scheduler_cli.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--trainer.log_every_n_steps=1",
        ]
    )
    (scheduler,) = [c for c in cli.trainer.callbacks if isinstance(c, DropoutScheduler)]
    encoder = Chain([Constant(0.0), Cosine(0.0, 0.3, steps=0.5)], milestones=[0.2])
    assert scheduler.schedules == {"encoder": encoder, "head": EarlyDropout(0.1, until=16)}
    assert cli.trainer.global_step == 16  # 2 epochs of 256 / 32 batches

    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    resolved = encoder.resolve(16)
    logged = {e.step: e.value for e in events.Scalars("dropout/encoder/p")}
    assert sorted(logged) == list(range(16))
    for step, value in logged.items():
        assert abs(value - resolved(step)) < 1e-7
    assert max(logged.values()) > 0.2
    assert {e.value for e in events.Scalars("dropout/head/p")} == {0.10000000149011612}
