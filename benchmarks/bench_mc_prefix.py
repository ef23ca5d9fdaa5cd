"""What MC restricted to a head saves, and what consistent masks cost (``mc_predict``).

Prefix: ``mc_predict`` on an ``nn.Sequential`` whose dropping sites all sit in its last
children runs the children before them once per batch, not once per pass. Measured against
the same network behind a plain ``forward`` (no prefix can be split off), batched and
looped, same seed (the samples are the same; ``tests/test_mc.py`` checks it).

Consistent masks: ``consistent=True`` (one fixed sub-network per pass) against plain MC,
batched, on networks with element, channel and DropConnect sites.

Same process, interleaved (the order rotates each repeat), medians of ``--repeats`` runs,
one torch thread. Ratio > 1: the first variant is faster.

    python benchmarks/bench_mc_prefix.py            # writes benchmarks/results/mc_prefix.{md,json}
    python benchmarks/bench_mc_prefix.py --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from bench_mc import environment  # run as a script: benchmarks/ is on sys.path
from torch import nn

from lightning_dropout import DropConnectLinear, Dropout, Dropout2d
from lightning_dropout.mc import mc_predict

RESULTS = Path(__file__).parent / "results"


class Wrapped(nn.Module):
    """The network behind a plain forward: MC replicates its whole input."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_backbone_head() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        Dropout(0.3), nn.Linear(512, 10),
    )  # fmt: skip


def cnn_backbone_head() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), Dropout2d(0.1),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), Dropout(0.3), nn.Linear(64 * 64, 10),
    )  # fmt: skip


def mixed_sites() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), Dropout2d(0.2), nn.Flatten(),
        nn.Linear(16 * 64, 256), nn.ReLU(), Dropout(0.3), DropConnectLinear(256, 256, p=0.3),
        nn.Linear(256, 10),
    )  # fmt: skip


# name -> (model, the head's site patterns: None for every site)
PREFIX_CASES: dict[str, tuple[Callable[[], nn.Sequential], list[str] | None]] = {
    "mlp, dropout before the last layer": (mlp_backbone_head, None),
    "cnn, MC on the head only": (cnn_backbone_head, ["7"]),
}


def timed(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for run in runs.values():  # warm-up
        run()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def prefix_rows(batch: int, n_samples: int, repeats: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name, (build, sites) in PREFIX_CASES.items():
        net = build().eval()
        wrapped = Wrapped(net)
        wrapped_sites = None if sites is None else [f"net.{s}" for s in sites]
        x = torch.randn(batch, 64)
        for batched in (True, False):
            common = {"n_samples": n_samples, "batched": batched, "seed": 0}
            ms = timed(
                {
                    "prefix": partial(mc_predict, net, x, sites=sites, **common),
                    "whole": partial(mc_predict, wrapped, x, sites=wrapped_sites, **common),
                },
                repeats,
            )
            rows.append(
                {
                    "model": name,
                    "mode": "batched" if batched else "looped",
                    "batch": batch,
                    "n_samples": n_samples,
                    "prefix_ms": ms["prefix"],
                    "whole_ms": ms["whole"],
                    "speed_up": ms["whole"] / ms["prefix"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def consistent_rows(batch: int, n_samples: int, repeats: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name, build in (
        ("mlp (element dropout)", mlp_backbone_head),
        ("mixed (channel, element, DropConnect)", mixed_sites),
    ):
        net = build().eval()
        x = torch.randn(batch, 64)
        ms = timed(
            {
                "plain": partial(mc_predict, net, x, n_samples, seed=0),
                "consistent": partial(mc_predict, net, x, n_samples, seed=0, consistent=True),
            },
            repeats,
        )
        rows.append(
            {
                "model": name,
                "batch": batch,
                "n_samples": n_samples,
                "plain_ms": ms["plain"],
                "consistent_ms": ms["consistent"],
                "cost": ms["consistent"] / ms["plain"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(
    env: dict[str, object], prefix: list[dict[str, object]], consistent: list[dict[str, object]]
) -> str:
    lines = [
        "# MC on a head: the deterministic prefix; the cost of consistent masks",
        "",
        "`benchmarks/bench_mc_prefix.py`. Prefix: `mc_predict` on an `nn.Sequential` whose dropping",
        'sites sit in its last children runs the children before them once per batch; "whole" is',
        "the same network behind a plain `forward`, replicated whole. Same seed, same samples.",
        "Consistent: `consistent=True` against plain MC, batched. Same process, interleaved,",
        "medians, one torch thread.",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "",
        "| model | mode | batch | n_samples | prefix ms | whole ms | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in prefix:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {r['n_samples']} | {r['prefix_ms']:.2f} "
            f"| {r['whole_ms']:.2f} | {r['speed_up']:.2f}x |"
        )
    lines += [
        "",
        "| model | batch | n_samples | plain ms | consistent ms | consistent / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in consistent:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['n_samples']} | {r['plain_ms']:.2f} "
            f"| {r['consistent_ms']:.2f} | {r['cost']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--n-samples", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # on shared cores, two-thread ops spin against other jobs
    env = environment()
    prefix = prefix_rows(args.batch, args.n_samples, args.repeats)
    consistent = consistent_rows(args.batch, args.n_samples, args.repeats)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        data = {"environment": env, "prefix": prefix, "consistent": consistent}
        (RESULTS / "mc_prefix.json").write_text(json.dumps(data, indent=2))
        (RESULTS / "mc_prefix.md").write_text(markdown(env, prefix, consistent))


if __name__ == "__main__":
    main()
