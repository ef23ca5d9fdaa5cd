"""Serve the dropout monitors' TensorBoard dashboard, check it over HTTP, screenshot it.

    python scripts/dashboard.py                      # train a small demo run, check, screenshot
    python scripts/dashboard.py --logdir DIR         # check an existing run instead
    python scripts/dashboard.py --no-screenshot      # the HTTP checks only

Starts ``tensorboard --logdir DIR`` on 127.0.0.1 on a free port, checks through its JSON
API that the custom-scalars layout and the monitors' tags are served, saves a headless
Chromium screenshot of the custom-scalars page (Debian: ``apt-get install -y chromium``)
and stops tensorboard by its own PID.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Tag patterns every monitored run must serve: (plugin, regex).
REQUIRED_TAGS = [
    ("scalars", r"coactivation/.+/(mean_abs_corr|decov|sparsity)$"),
    ("images", r"coactivation/.+/corr$"),
    ("histograms", r"coactivation/.+/mean_activation$"),
    ("scalars", r"channel_drop/.+/(fraction|expected)$"),
    ("histograms", r"channel_drop/.+/per_channel$"),
    ("scalars", r"dropout/.+/(p|realised)$"),
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1400,1900",
    "--virtual-time-budget=15000",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(base_url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base_url}{path}{query}", timeout=10) as response:
        return json.load(response)


@contextmanager
def tensorboard(logdir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``logdir`` with tensorboard on 127.0.0.1; yields the base URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {process.returncode}: {process.stderr.read()}")
            try:
                if get_json(base_url, "/data/plugin/scalars/tags"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensorboard did not serve {logdir} within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()  # our own process, by its PID
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_dashboard(base_url: str) -> dict[str, Any]:
    """Check the served layout and tags; return a summary, raise AssertionError if wrong.

    Every run must serve the monitors' tags (:data:`REQUIRED_TAGS`) and a custom-scalars
    layout whose every chart regex matches at least one served scalar tag.
    """
    tags = {
        plugin: get_json(base_url, f"/data/plugin/{plugin}/tags")
        for plugin in ("scalars", "images", "histograms")
    }
    runs = sorted(tags["scalars"])
    assert runs, "tensorboard serves no runs with scalars"
    scalar_tags = {tag for run in runs for tag in tags["scalars"][run]}
    for plugin, regex in REQUIRED_TAGS:
        served = {tag for run in tags[plugin].values() for tag in run}
        assert any(re.match(regex, tag) for tag in served), f"no {plugin} tag matches {regex}"

    layout = get_json(base_url, "/data/plugin/custom_scalars/layout")
    categories = layout.get("category", [])
    assert categories, "no custom-scalars layout is served"
    charts = [chart for category in categories for chart in category.get("chart", [])]
    for chart in charts:
        for regex in chart["multiline"]["tag"]:
            assert any(re.match(regex, tag) for tag in scalar_tags), f"layout regex {regex} matches no tag"

    sample_run, sample_tag = min(
        (run, tag) for run in runs for tag in tags["scalars"][run] if tag.startswith("dropout/")
    )
    points = get_json(base_url, "/data/plugin/scalars/scalars", run=sample_run, tag=sample_tag)
    assert points and len(points[0]) == 3, f"no [wall_time, step, value] points for {sample_tag}"
    return {
        "runs": runs,
        "categories": [category["title"] for category in categories],
        "charts": len(charts),
        "scalar_tags": len(scalar_tags),
        "image_tags": sum(len(run) for run in tags["images"].values()),
        "histogram_tags": sum(len(run) for run in tags["histograms"].values()),
    }


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(url: str, out: Path, chromium: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")


def train_demo(logdir: Path, max_epochs: int = 8) -> Path:
    """A small CNN on 8x8 digits with element and channel dropout, all three monitors on,
    and p ramped from 0.1 to 0.5 by DropoutScheduler so the realised rates visibly track it."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dropout import Dropout, Dropout2d, schedules
    from lightning_dropout.callbacks import (
        ChannelDropMonitor,
        CoActivationMonitor,
        DropoutScheduler,
        DropRateMonitor,
    )

    pl.seed_everything(0, verbose=False)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    data = DataLoader(TensorDataset(x, torch.tensor(digits.target)), batch_size=64, shuffle=True)

    class DigitsCNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                Dropout2d(0.1),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
            )
            self.head = nn.Sequential(
                nn.Flatten(), nn.Linear(32 * 64, 128), nn.ReLU(), Dropout(0.1), nn.Linear(128, 10)
            )

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(self.head(self.features(inputs)), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    # DropoutScheduler logs dropout/all/p, which the layout charts beside the realised rates.
    ramp = DropoutScheduler(schedules.Linear(0.1, 0.5, steps=1.0))
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        logger=TensorBoardLogger(logdir, name="digits_cnn", version=0),
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[ramp, CoActivationMonitor(max_units=32), ChannelDropMonitor(), DropRateMonitor()],
    )
    trainer.fit(DigitsCNN(), data)
    return logdir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logdir", type=Path, help="an existing run directory (default: train the demo)")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--no-screenshot", action="store_true")
    parser.add_argument("--page", default="custom_scalars", help="the dashboard page to screenshot")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        logdir = args.logdir or train_demo(Path(scratch) / "logs")
        with tensorboard(logdir) as base_url:
            summary = check_dashboard(base_url)
            print(json.dumps(summary, indent=2))
            if args.no_screenshot:
                return 0
            chromium = find_chromium()
            if chromium is None:
                print("no chromium found (apt-get install -y chromium): screenshot skipped")
                return 0
            screenshot(f"{base_url}/#{args.page}", args.screenshot, chromium)
            print(f"screenshot: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
