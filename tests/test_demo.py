"""The demo (the README's main job) end to end in a fast mode: progress lines, the tables,
the PNGs, report.md and the TensorBoard logs."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dropout.cli import main
from lightning_dropout.demo import DemoConfig, run_demo

FAST = ["--max-epochs", "2", "--seeds", "2", "--ae-epochs", "2", "--width", "64"]
CLASSIFIERS = [
    "mlp_no_dropout",
    "mlp_scheduled_dropout",
    "cnn_no_dropout",
    "cnn_element_dropout",
    "cnn_spatial_dropout",
]


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
    runs = re.findall(r"^\[\s*(\d+)/12\] (\S+)\s+seed (\d+) ", printed, flags=re.MULTILINE)
    assert [int(index) for index, _, _ in runs] == list(range(1, 13))
    assert [name for _, name, _ in runs] == [
        "autoencoder_no_dropout",
        "autoencoder_dropout",
        *CLASSIFIERS * 2,
    ]
    assert [seed for _, _, seed in runs] == ["0"] * 7 + ["1"] * 5
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


def test_tables_report_mean_and_sd_over_seeds(demo_run: tuple[Path, str]) -> None:
    _, printed = demo_run
    models = _rows(printed, "| model | test error | Δ error | test NLL | Δ NLL | NLL gap")
    assert [row[0] for row in models] == CLASSIFIERS
    for row in models:
        assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", row[1]) and re.fullmatch(
            r"\d\.\d{3} ± \d\.\d{3}", row[3]
        )
        assert (row[2] == "-") == (row[0].endswith("no_dropout"))  # paired differences for dropout models
    units = _rows(printed, "| model | layer | mean abs corr | sparsity | mean activation | p / realised")
    assert [row[1] for row in units] == ["relu1", "relu2"] * 5
    for row in units:
        corr, sparsity = (float(cell.split(" ± ")[0]) for cell in row[2:4])
        assert 0.0 <= corr <= 1.0 and 0.0 <= sparsity <= 1.0
    scheduled = units[2][5].split(" / ")
    assert float(scheduled[0]) == 0.5  # the schedule reached 0.5 after 30% of training
    assert abs(float(scheduled[1]) - 0.5) < 0.1  # realised rate of p = 0.5 on ~1000 x 64 units
    autoencoders = _rows(printed, "| model | p | test BCE | mean activation")
    assert [row[:2] for row in autoencoders] == [
        ["autoencoder_no_dropout", "0"],
        ["autoencoder_dropout", "0.5"],
    ]
    assert re.search(r"tensorboard --logdir \S+runs --host 127\.0\.0\.1", printed)


def test_pngs_and_report_are_written(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    for name in ("figure7_features.png", "figure8_activations.png", "report.md"):
        assert str(out / name) in printed
    with Image.open(out / "figure7_features.png") as figure7:
        assert figure7.width > 2 * figure7.height * 0.9  # two square grids side by side
    with Image.open(out / "figure8_activations.png") as figure8:
        assert figure8.size == (960, 640)  # 2 x 2 histograms
    report = (out / "report.md").read_text()
    assert "](figure7_features.png)" in report and "](figure8_activations.png)" in report
    assert "| mlp_scheduled_dropout |" in report and "300 training digits" in report


def test_tensorboard_has_figures_7_and_8_for_both_autoencoders(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    for name in ("autoencoder_no_dropout", "autoencoder_dropout"):
        events = _events(out / name / "seed0")
        (image,) = events.Images("figure7/features")  # logged after the last of 2 epochs
        assert image.width == image.height == 546  # 16 x 16 tiles of 8 x 8 pixels zoomed 4x
        assert {"figure8/mean_activation", "figure8/activation"} <= set(events.Tags()["histograms"])
        (histogram,) = events.Histograms("figure8/mean_activation")
        assert histogram.histogram_value.num == 256  # one mean per hidden unit


def test_classifier_runs_log_every_dashboard(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    assert sorted(path.name for path in (out / "mlp_scheduled_dropout").iterdir()) == ["seed0", "seed1"]
    mlp = _events(out / "mlp_scheduled_dropout" / "seed1").Tags()
    for tag in (
        "coactivation/net.relu1/mean_abs_corr",
        "coactivation/net.relu2/sparsity",
        "dropout/net.drop1/realised",
        "dropout/all/p",
        "val/loss",
    ):
        assert tag in mlp["scalars"], tag
    assert "coactivation/net.relu1/corr" in mlp["images"]
    element = _events(out / "cnn_element_dropout" / "seed0").Tags()
    assert "dropout/net.drop1/realised" in element["scalars"]
    assert not any(tag.startswith("channel_drop/") for tag in element["scalars"])
    spatial = _events(out / "cnn_spatial_dropout" / "seed0").Tags()
    assert {"channel_drop/net.drop1/fraction", "channel_drop/net.drop1/expected"} <= set(spatial["scalars"])


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-epochs", "0"), ("--seeds", "0"), ("--ae-epochs", "0"), ("--train-size", "1597")],
)
def test_demo_refuses_bad_arguments(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", flag, value])
    assert flag in capsys.readouterr().err


def test_demo_is_reproducible_under_its_seed(tmp_path: Path) -> None:
    def run(out: str) -> tuple:
        config = DemoConfig(max_epochs=1, seeds=1, autoencoder_epochs=1, width=32, out=str(tmp_path / out))
        result = run_demo(config, progress=lambda line: None)
        features = [ae.features for ae in result.autoencoders]
        return result.runs, features

    runs_a, features_a = run("a")
    runs_b, features_b = run("b")
    assert runs_a == runs_b  # every model, the first one's initialisation included
    assert all(torch.equal(a, b) for a, b in zip(features_a, features_b, strict=True))
