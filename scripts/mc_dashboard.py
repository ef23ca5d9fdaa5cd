"""The MC dropout uncertainty dashboard: run examples/mc_ood.py, check what TensorBoard serves,
screenshot the reliability diagram beside the MC against deterministic charts.

    python scripts/mc_dashboard.py                   # run the example, check, screenshot
    python scripts/mc_dashboard.py --logdir DIR      # an existing examples/mc_ood.py log dir
    python scripts/mc_dashboard.py --no-screenshot   # the HTTP checks only

Serves the log directory with tensorboard (see scripts/dashboard.py), checks through its
JSON API that the MC tags are served (``val/{mc,det}/...``, ``val/mc/reliability``, the
entropy and BALD histograms, ``test/mc/ood_*``, the custom-scalars charts), then takes two
headless Chromium screenshots of the ``fit`` run, the Images tab filtered to the
reliability diagram and the Scalars tab filtered to the MC and deterministic ECE and NLL,
and puts them side by side in ``docs/mc_dashboard.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from dashboard import CHROMIUM_FLAGS, find_chromium, get_json, tensorboard
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_TAGS = [
    ("scalars", r"val/(mc|det)/(accuracy|nll|brier|ece)$"),
    ("scalars", r"val/mc/standard_error$"),
    ("scalars", r"test/mc/ood_(auroc_entropy|auroc_bald|fpr95_entropy)$"),
    ("images", r"(val|test)/mc/reliability$"),
    ("histograms", r"(val|test)/mc/(entropy|bald)$"),
]
# (tab, URL fragment options, window width): the fit run, unsmoothed.
PANES = [
    ("images", {"tagFilter": "reliability"}, 620),
    ("scalars", {"tagFilter": "val/(mc|det)/(ece|nll)", "_smoothingWeight": "0"}, 1100),
]
HEIGHT = 800
# Twice the pixels: TensorBoard shrinks an image to its card's width, and the diagram's
# legend stays legible this way.
SCALE = 2


def check_mc_dashboard(base_url: str) -> dict[str, Any]:
    """Every MC tag family is served, and the layout has the MC charts; returns a summary."""
    tags = {
        plugin: get_json(base_url, f"/data/plugin/{plugin}/tags")
        for plugin in ("scalars", "images", "histograms")
    }
    for plugin, regex in REQUIRED_TAGS:
        served = {tag for run in tags[plugin].values() for tag in run}
        assert any(re.match(regex, tag) for tag in served), f"no {plugin} tag matches {regex}"
    layout = get_json(base_url, "/data/plugin/custom_scalars/layout")
    titles = [chart["title"] for category in layout.get("category", []) for chart in category["chart"]]
    assert any(title.startswith("val: ece") for title in titles), titles
    points = get_json(base_url, "/data/plugin/scalars/scalars", run="fit", tag="val/mc/ece")
    return {
        "runs": sorted(tags["scalars"]),
        "validation_epochs": len(points),
        "last_val_ece": {
            which: get_json(base_url, "/data/plugin/scalars/scalars", run="fit", tag=f"val/{which}/ece")[-1][
                2
            ]
            for which in ("mc", "det")
        },
        "charts": len(titles),
    }


def pane(
    base_url: str, tab: str, options: dict[str, str], width: int, chromium: str, out: Path
) -> Image.Image:
    fragment = "&".join(
        f"{k}={urllib.parse.quote(v, safe='')}" for k, v in {**options, "regexInput": "fit"}.items()
    )
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--window-size")]
    flags += [f"--window-size={width},{HEIGHT}", f"--force-device-scale-factor={SCALE}"]
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium,
            *flags,
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"{base_url}/#{tab}&{fragment}",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    return Image.open(out).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logdir", type=Path, help="an examples/mc_ood.py log dir (<out>/mc_ood)")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "mc_dashboard.png")
    parser.add_argument("--no-screenshot", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        logdir = args.logdir
        if logdir is None:
            out = Path(scratch) / "runs"
            subprocess.run(
                [sys.executable, "mc_ood.py", "--out", str(out)], check=True, cwd=ROOT / "examples"
            )
            logdir = out / "mc_ood"
        with tensorboard(logdir) as base_url:
            print(json.dumps(check_mc_dashboard(base_url), indent=2))
            chromium = find_chromium()
            if args.no_screenshot:
                return 0
            if chromium is None:
                print("no chromium found (apt-get install -y chromium): screenshot skipped")
                return 0
            images = [
                pane(base_url, tab, options, width, chromium, Path(scratch) / f"{tab}.png")
                for tab, options, width in PANES
            ]
        combined = Image.new("RGB", (sum(image.width for image in images), HEIGHT * SCALE), "white")
        x = 0
        for image in images:
            combined.paste(image, (x, 0))
            x += image.width
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        combined.save(args.screenshot, optimize=True)
        print(f"screenshot: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
