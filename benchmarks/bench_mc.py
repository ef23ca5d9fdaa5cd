"""Batched versus looped Monte-Carlo dropout inference (``mc_predict``), same process.

Looped MC is what users write by hand (``n_samples`` forward calls); batched MC replicates
the input along dim 0 and runs the passes in one call per chunk (with per-replica
DropConnect masks). For each model and batch size the two modes run interleaved; the
medians of ``--repeats`` runs give the ratio looped / batched (> 1: batched is faster).
Peak memory is the largest sum of live CPU tensors during one ``mc_predict`` call, from
torch's profiler memory timeline (``profile_memory=True``), inputs and weights included.

    python benchmarks/bench_mc.py      # writes benchmarks/results/mc_batched_vs_looped.{md,json}
    python benchmarks/bench_mc.py --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from lightning_dropout import DropConnectLinear, Dropout, Dropout2d
from lightning_dropout.mc import mc_predict

RESULTS = Path(__file__).parent / "results"


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(), Dropout(0.3),
        nn.Linear(512, 512), nn.ReLU(), Dropout(0.3), nn.Linear(512, 10),
    )  # fmt: skip


def dropconnect_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(), Dropout(0.3),
        DropConnectLinear(512, 512, p=0.3, activation="relu"), Dropout(0.3), nn.Linear(512, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        Dropout2d(0.2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), Dropout2d(0.2), nn.Flatten(), nn.Linear(64 * 64, 10),
    )  # fmt: skip


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "dropconnect_mlp": dropconnect_mlp, "cnn": cnn}


def peak_bytes(run: Callable[[], object]) -> int:
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        run()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return int(max(sum(row) for row in sizes))


def bench(name: str, batch: int, n_samples: int, repeats: int) -> dict[str, object]:
    model = MODELS[name]().eval()
    x = torch.randn(batch, 64)
    runs = {
        "batched": lambda: mc_predict(model, x, n_samples=n_samples, batched=True),
        "one_call": lambda: mc_predict(model, x, n_samples=n_samples, batched=True, chunk_size=n_samples),
        "looped": lambda: mc_predict(model, x, n_samples=n_samples, batched=False),
    }
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for mode in runs:  # warm-up
        runs[mode]()
    modes = list(runs)
    for i in range(repeats):
        # Rotate the order: whichever mode runs first after another pays for its cache misses.
        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
            start = time.perf_counter()
            runs[mode]()
            times[mode].append(time.perf_counter() - start)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    peaks = {mode: peak_bytes(run) for mode, run in runs.items()}
    return {
        "model": name,
        "batch": batch,
        "n_samples": n_samples,
        "batched_ms": medians["batched"] * 1e3,
        "one_call_ms": medians["one_call"] * 1e3,
        "looped_ms": medians["looped"] * 1e3,
        "ratio_looped_over_batched": medians["looped"] / medians["batched"],
        "ratio_looped_over_one_call": medians["looped"] / medians["one_call"],
        "batched_peak_mib": peaks["batched"] / 2**20,
        "one_call_peak_mib": peaks["one_call"] / 2**20,
        "looped_peak_mib": peaks["looped"] / 2**20,
    }


def environment() -> dict[str, object]:
    return {
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores "
        f"(shared with other jobs), torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg()[0],
    }


def markdown(env: dict[str, object], rows: list[dict[str, object]]) -> str:
    lines = [
        "# Batched vs looped Monte-Carlo dropout inference",
        "",
        "`benchmarks/bench_mc.py`: `mc_predict(model, x, n_samples)` with `batched=True` (input",
        "replicated along dim 0, by default one forward call per chunk of at most 1024 rows, per-replica",
        "DropConnect masks) versus `batched=False` (one call per pass). Same process, interleaved,",
        'medians; "one call" is batched with all replicas in one call (`chunk_size=n_samples`).',
        "Ratio = looped / batched (> 1: batched faster). Peak = largest sum of live CPU",
        "tensors during one call (torch profiler memory timeline; input and weights included).",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "",
        "| model | batch | n_samples | batched ms | one call ms | looped ms | ratio batched | ratio one call "
        "| batched peak MiB | one call peak MiB | looped peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['n_samples']} | {r['batched_ms']:.2f} "
            f"| {r['one_call_ms']:.2f} | {r['looped_ms']:.2f} | {r['ratio_looped_over_batched']:.2f}x "
            f"| {r['ratio_looped_over_one_call']:.2f}x | {r['batched_peak_mib']:.2f} "
            f"| {r['one_call_peak_mib']:.2f} | {r['looped_peak_mib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n-samples", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    # One thread: on shared cores, torch's two-thread ops spin against other jobs and the
    # timings turn into noise.
    torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    for name in MODELS:
        for batch in args.batches:
            row = bench(name, batch, args.n_samples, args.repeats)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "mc_batched_vs_looped.json").write_text(
            json.dumps({"environment": env, "rows": rows}, indent=2)
        )
        (RESULTS / "mc_batched_vs_looped.md").write_text(markdown(env, rows))


if __name__ == "__main__":
    main()
