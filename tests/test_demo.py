"""The demo (the README's main job) end to end on a few MNIST digits: progress lines, the
tables, results.json, the PNGs, report.md and the TensorBoard logs."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dropout.cli import main
from lightning_dropout.demo import DemoConfig, run_demo

TINY = ["--train-size", "100", "--test-size", "100", "--ae-digits", "200"]
FAST = ["--max-epochs", "2", "--seeds", "2", "--ae-epochs", "1", *TINY]
CLASSIFIERS = ["mlp_no_dropout", "mlp_dropout", "mlp_scheduled_dropout"]
AUTOENCODERS = ["autoencoder_no_dropout", "autoencoder_dropout"]


def _events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "runs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", *FAST, "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_one_progress_line_per_run(demo_run: tuple[Path, str]) -> None:
    _, printed = demo_run
    runs = re.findall(r"^\[\s*(\d+)/8\] (\S+)\s+seed (\d+) ", printed, flags=re.MULTILINE)
    assert [int(index) for index, _, _ in runs] == list(range(1, 9))
    assert [name for _, name, _ in runs] == [*AUTOENCODERS, *CLASSIFIERS * 2]
    assert [seed for _, _, seed in runs] == ["0"] * 5 + ["1"] * 3
    assert "Epoch" not in printed and "GPU available" not in printed  # no Lightning bars or banners


def _rows(printed: str, header_start: str) -> list[list[str]]:
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def test_tables_report_mean_sd_and_paired_intervals(demo_run: tuple[Path, str]) -> None:
    _, printed = demo_run
    models = _rows(printed, "| model | test error | test NLL, last epoch | test NLL, best epoch | NLL gap")
    assert [row[0] for row in models] == CLASSIFIERS
    assert all(re.fullmatch(r"-?\d\.\d{3} ± \d\.\d{3}", cell) for row in models for cell in row[1:])
    paired = _rows(printed, "| paired by seed |")
    assert [row[0] for row in paired] == [
        "mlp_dropout - mlp_no_dropout",
        "mlp_scheduled_dropout - mlp_no_dropout",
    ]
    assert all(
        re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\], [012]/2 lower", c)
        for c in paired[0][1:5]
    )
    autoencoders = _rows(printed, "| model | p | held-out BCE")
    assert [row[:2] for row in autoencoders] == [
        ["autoencoder_no_dropout", "0"],
        ["autoencoder_dropout", "0.5"],
    ]
    assert re.search(r"tensorboard --logdir \S+runs --host 127\.0\.0\.1", printed)


def test_results_json_has_every_model_and_seed(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    assert list(results) == [*CLASSIFIERS, *AUTOENCODERS]
    for model in CLASSIFIERS:
        assert list(results[model]) == ["0", "1"]
        run = results[model]["1"]
        assert len(run["test_nll_curve"]) == 2 and run["test_nll_last"] == run["test_nll_curve"][-1]
        assert run["test_nll_best"] == min(run["test_nll_curve"]) and 0 <= run["test_error"] <= 1
    for model in AUTOENCODERS:
        (seed,) = results[model]
        assert seed == "0" and 0 <= results[model]["0"]["zero_fraction"] <= 1


def test_pngs_and_report_are_written(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    for name in ("figure7_features.png", "figure8_activations.png", "test_nll_curves.png", "report.md"):
        assert str(out / name) in printed
    with Image.open(out / "figure7_features.png") as figure7:
        assert figure7.width > 2 * figure7.height * 0.9  # two square grids side by side
    report = (out / "report.md").read_text()
    assert "](figure7_features.png)" in report and "](test_nll_curves.png)" in report
    assert "| mlp_scheduled_dropout |" in report and "100 training and 100 test digits" in report


def test_tensorboard_has_the_curves_and_figures_7_and_8(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    for name in AUTOENCODERS:
        events = _events(out / name / "seed0")
        (image,) = events.Images("figure7/features")  # logged after the last epoch
        assert image.width == image.height  # a square grid of live units' 28x28 features
        assert {"figure8/mean_activation", "figure8/activation"} <= set(events.Tags()["histograms"])
        (histogram,) = events.Histograms("figure8/mean_activation")
        assert histogram.histogram_value.num == 256  # one mean per hidden unit
    curve = _events(out / "mlp_no_dropout" / "seed1").Scalars("test/nll")
    assert [event.step for event in curve] == [1, 2]  # one point per epoch
    scheduled = _events(out / "mlp_scheduled_dropout" / "seed0").Tags()
    for tag in ("dropout/net.drop_in/p", "dropout/net.drop2/p", "dropout/net.drop1/realised", "train/nll"):
        assert tag in scheduled["scalars"], (tag, scheduled["scalars"])


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-epochs", "0"),
        ("--seeds", "0"),
        ("--ae-epochs", "0"),
        ("--train-size", "2001"),
        ("--ae-digits", "4001"),
    ],
)
def test_demo_refuses_bad_arguments(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", flag, value])
    assert flag in capsys.readouterr().err


def test_demo_is_reproducible_under_its_seed(tmp_path: Path) -> None:
    def run(out: str) -> tuple:
        config = DemoConfig(
            max_epochs=1,
            seeds=1,
            autoencoder_epochs=1,
            train_size=100,
            test_size=100,
            autoencoder_digits=200,
            out=str(tmp_path / out),
        )
        result = run_demo(config, progress=lambda line: None)
        return result.runs, [ae.metrics() for ae in result.autoencoders]

    assert run("a") == run("b")  # every model, the first one's initialisation included
