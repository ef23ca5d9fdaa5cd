"""What scoring an active-learning pool costs: 3,000 MNIST digits, 20 MC dropout passes.

The pool is scored as :class:`lightning_dropout.active.ActiveLearningLoop` does it:
``mc_predict(net, batch, 20, return_samples=True)`` over batches of 512, then BALD. The
network is the example's CNN (``examples/active_mnist.py``): an ``nn.Sequential`` whose
convolutions come before its first dropout, so ``mc_predict`` runs them once per batch and
only the dense head once per pass. The target is at most 2x the floor: one deterministic
pass over the pool plus 20 passes of the head over precomputed features. "Whole" is the
same network behind a plain ``forward``, so every pass runs the convolutions too.

Same process, interleaved (the order rotates each repeat), medians of ``--repeats`` runs,
one torch thread.

    python benchmarks/bench_active_pool.py   # writes benchmarks/results/active_pool_scoring.{md,json}
    python benchmarks/bench_active_pool.py --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_mc import environment  # run as a script: benchmarks/ is on sys.path
from torch import Tensor, nn

from lightning_dropout.active import bald
from lightning_dropout.mc import mc_dropout, mc_predict

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from active_mnist import SmallCNN  # noqa: E402


class Whole(nn.Module):
    """The network behind a plain forward: no deterministic prefix can be split off."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pool", type=int, default=3000)
    parser.add_argument("--n-samples", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from lightning_dropout.demo.data import load_mnist_tensors

    pool = load_mnist_tensors()[0][: args.pool]
    net = SmallCNN().net.eval()
    split = next(i for i, m in enumerate(net) if isinstance(m, nn.Dropout))
    prefix, head = net[:split], net[split:]
    batches = pool.split(512)
    with torch.no_grad():
        features = [prefix(b) for b in batches]

    def deterministic() -> None:
        with torch.no_grad():
            for b in batches:
                net(b)

    def heads() -> None:
        with torch.no_grad(), mc_dropout(head):
            for f in features:
                for _ in range(args.n_samples):
                    head(f)

    def score(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            parts = [mc_predict(model, b, args.n_samples, return_samples=True).samples for b in batches]
            bald(torch.cat(parts, 1))

        return run

    variants: dict[str, Callable[[], None]] = {
        "deterministic pass": deterministic,
        f"{args.n_samples} head passes": heads,
        "pool scoring (prefix once)": score(net),
        "pool scoring (whole net per pass)": score(Whole(net)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for fn in variants.values():
        fn()  # warm-up
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    floor = ms["deterministic pass"] + ms[f"{args.n_samples} head passes"]
    result = {
        "environment": environment(),
        "pool": args.pool,
        "n_samples": args.n_samples,
        "repeats": args.repeats,
        "median_ms": ms,
        "floor_ms": floor,
        "scoring_over_floor": ms["pool scoring (prefix once)"] / floor,
        "whole_over_floor": ms["pool scoring (whole net per pass)"] / floor,
    }
    print(json.dumps(result, indent=1))
    if args.no_write:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "active_pool_scoring.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Scoring an active-learning pool: 3,000 digits, 20 MC dropout passes",
        "",
        "`benchmarks/bench_active_pool.py`: the example's CNN; the pool scored as the loop does",
        "(`mc_predict(..., return_samples=True)` over batches of 512, then BALD). Floor = one",
        "deterministic pass over the pool + 20 head passes over precomputed features. Same process,",
        f"interleaved, medians of {args.repeats}, one torch thread.",
        "",
        *(f"- {k}: {v}" for k, v in result["environment"].items()),  # type: ignore[union-attr]
        "",
        "| variant | ms |",
        "|---|---:|",
        *(f"| {name} | {value:.1f} |" for name, value in ms.items()),
        "",
        f"Pool scoring / floor: **{result['scoring_over_floor']:.2f}x** (target at most 2x); "
        f"whole net per pass / floor: {result['whole_over_floor']:.2f}x.",
        "",
    ]
    (RESULTS / "active_pool_scoring.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
