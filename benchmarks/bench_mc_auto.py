"""What ``n_samples="auto"`` saves against a fixed 30 passes, at the same tolerance.

The demo's models (``DigitsMLP(256, 2, p=0.5)``, ``DigitsCNN(p=0.2)``, spatial dropout) are
trained for a few epochs on scikit-learn's 8x8 digits; on 500 held-out digits, in
batches of 100, ``mc_predict(n_samples="auto", tolerance=t)`` draws passes until the
Monte-Carlo standard error of every mean probability of the batch is at most ``t``. For
each tolerance: the mean passes auto drew per batch, the batches where 30 fixed passes
meet the tolerance, and the wall time of fixed 30 against auto (same process, interleaved,
medians of ``--repeats``, one torch thread; ratio > 1: auto is faster).

    python benchmarks/bench_mc_auto.py            # writes benchmarks/results/mc_auto.{md,json}
    python benchmarks/bench_mc_auto.py --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_mc import environment  # run as a script: benchmarks/ is on sys.path
from torch import nn

from lightning_dropout.demo.data import load_digits_tensors, stratified_split
from lightning_dropout.demo.models import DigitsCNN, DigitsMLP
from lightning_dropout.mc import mc_predict

RESULTS = Path(__file__).parent / "results"
TOLERANCES = (0.02, 0.05, 0.1)
FIXED = 30


def trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(y), generator=g).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    return model.eval()


def measure(
    model: nn.Module, batches: list[torch.Tensor], tolerance: float, repeats: int
) -> dict[str, float]:
    auto_passes, auto_worst, fixed_worst, fixed_meets = [], 0.0, 0.0, 0
    for i, x in enumerate(batches):
        auto = mc_predict(model, x, n_samples="auto", tolerance=tolerance, max_samples=2000, seed=i)
        fixed = mc_predict(model, x, n_samples=FIXED, seed=i)
        assert auto.standard_error is not None and fixed.standard_error is not None
        auto_passes.append(auto.n_samples)
        auto_worst = max(auto_worst, float(auto.standard_error.max()))
        worst = float(fixed.standard_error.max())
        fixed_worst = max(fixed_worst, worst)
        fixed_meets += worst <= tolerance
    times: dict[str, list[float]] = {"fixed": [], "auto": []}
    for repeat in range(repeats):
        for name in ("fixed", "auto") if repeat % 2 == 0 else ("auto", "fixed"):
            start = time.perf_counter()
            for i, x in enumerate(batches):
                n: int | str = FIXED if name == "fixed" else "auto"
                mc_predict(model, x, n_samples=n, tolerance=tolerance, max_samples=2000, seed=i)
            times[name].append(time.perf_counter() - start)
    return {
        "tolerance": tolerance,
        "auto_mean_passes": statistics.mean(auto_passes),
        "auto_max_passes": max(auto_passes),
        "auto_worst_standard_error": auto_worst,
        "fixed_worst_standard_error": fixed_worst,
        "fixed_batches_meeting_tolerance": f"{fixed_meets}/{len(batches)}",
        "time_fixed_over_auto": statistics.median(times["fixed"]) / statistics.median(times["auto"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels = load_digits_tensors()
    train, test = stratified_split(labels, [1200, 500], seed=0)
    models = {
        "DigitsMLP(256, 2, p=0.5)": (DigitsMLP(width=256, depth=2, p=0.5), images.flatten(1)),
        "DigitsCNN(p=0.2, spatial)": (DigitsCNN(p=0.2), images),
    }
    env = environment()
    rows = []
    for name, (model, x) in models.items():
        trained(model, x[train], labels[train])
        batches = list(x[test].split(100))
        for tolerance in TOLERANCES:
            row = {"model": name, **measure(model, batches, tolerance, args.repeats)}
            print(row)
            rows.append(row)
    if args.no_write:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mc_auto.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    lines = [
        '# n_samples="auto" against 30 fixed passes',
        "",
        f"{env['device']}; torch {env['torch']}. 500 held-out 8x8 digits in batches of 100; auto stops",
        "when every mean probability of the batch has a Monte-Carlo standard error <= tolerance.",
        "",
        "| model | tolerance | auto: mean passes | auto: most passes | auto: worst SE | "
        "30 fixed: worst SE | 30 fixed: batches meeting it | time 30 fixed / auto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['tolerance']} | {row['auto_mean_passes']:.1f} | "
            f"{row['auto_max_passes']} | "
            f"{row['auto_worst_standard_error']:.4f} | {row['fixed_worst_standard_error']:.4f} | "
            f"{row['fixed_batches_meeting_tolerance']} | {row['time_fixed_over_auto']:.2f}x |"
        )
    (RESULTS / "mc_auto.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
