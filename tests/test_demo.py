"""The demo (the README's main job) in a fast mode: the table and the TensorBoard logs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dropout.cli import main


def test_demo_prints_the_table_and_logs_every_dashboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert main(["demo", "--max-epochs", "2", "--out", str(out), "--width", "64", "--no-progress-bar"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | test error | hidden layer | mean abs corr | sparsity")
    models = [row.split("|")[1].strip() for row in rows[1:]]
    assert [m for m in models if m] == ["mlp_no_dropout", "mlp_scheduled_dropout", "cnn_spatial_dropout"]
    assert len(rows) == 1 + 2 + 2 + 2  # header + two hidden layers per model
    for row in rows[1:]:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert 0.0 <= float(cells[3]) <= 1.0 and 0.0 <= float(cells[4]) <= 1.0
    scheduled = rows[3].split("|")
    assert float(scheduled[7]) == 0.5  # the schedule reached 0.5 after 30% of training
    assert 0.35 < float(scheduled[8]) < 0.65  # realised rate of p = 0.5 on ~400 x 64 units
    assert re.search(r"tensorboard --logdir \S+runs --host 127\.0\.0\.1", printed)

    def tags(name: str) -> dict[str, list[str]]:
        (run,) = (out / name).iterdir()
        events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
        events.Reload()
        return events.Tags()

    mlp = tags("mlp_scheduled_dropout")
    for tag in (
        "coactivation/net.relu1/mean_abs_corr",
        "coactivation/net.relu1/decov",
        "coactivation/net.relu2/sparsity",
        "dropout/net.drop1/realised",
        "dropout/all/p",
    ):
        assert tag in mlp["scalars"], tag
    assert "coactivation/net.relu1/corr" in mlp["images"]
    assert "coactivation/net.relu1/mean_activation" in mlp["histograms"]
    assert "coactivation/net.relu2/mean_abs_corr" in tags("mlp_no_dropout")["scalars"]
    cnn = tags("cnn_spatial_dropout")
    assert {"channel_drop/net.drop1/fraction", "channel_drop/net.drop1/expected"} <= set(cnn["scalars"])
    assert "channel_drop/net.drop1/per_channel" in cnn["histograms"]


def test_demo_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--max-epochs", "0"])
    assert "--max-epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--seed", "x"])


def test_demo_is_reproducible_under_its_seed(tmp_path: Path) -> None:
    from lightning_dropout.demo import DemoConfig, run_demo

    def run(out: str) -> list:
        config = DemoConfig(max_epochs=1, out=str(tmp_path / out), width=32, progress_bar=False)
        return run_demo(config)

    assert run("a") == run("b")  # every model, the first one's initialisation included
