"""Where the CPU kernels beat torch ops: forward + backward by size, for the dispatch thresholds.

Run from the repository root: ``python -m benchmarks.sizes``. For each rule of
:mod:`lightning_dropout.kernels` (elements, channels, Gaussian noise) and each size, times
three ways in one process, interleaved: the numba kernels (``_cpu``), the torch-ops
reference path, and torch's own layer. The dispatch sends a size to the kernels from
the first size at which they beat the reference path (``CPU_MIN_NUMEL*``). Writes
``results/sizes.md`` and ``results/sizes.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.run import RESULTS, _timed, host_description, versions
from lightning_dropout.kernels import _cpu, reference

Run = Callable[[Tensor], Tensor]


def _rules(p: float) -> dict[str, tuple[Callable[[int], tuple[int, ...]], Run | None, Run, Run]]:
    scale, sigma = 1.0 / (1.0 - p), math.sqrt(p / (1.0 - p))
    return {
        "elements": (
            lambda n: (n,),
            lambda x: _cpu.dropout(x, p, scale),
            lambda x: reference.dropout(x, p),
            nn.Dropout(p),
        ),
        "channels": (
            lambda n: (max(1, n // 4096), 64, 64) if n >= 4096 else (1, 64, max(1, n // 64)),
            None,  # no channel kernel: torch ops win at every size (results/sizes.md)
            lambda x: reference.channel_dropout(x, p),
            nn.Dropout1d(p),
        ),
        "gaussian": (
            lambda n: (n,),
            lambda x: _cpu.gaussian_dropout(x, sigma),
            lambda x: reference.gaussian_dropout(x, sigma),
            lambda x: x * (1.0 + sigma * torch.randn_like(x)),
        ),
    }


def measure(n: int, shape: tuple[int, ...], runs: dict[str, Run], repeats: int) -> dict[str, float]:
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def step(fn: Run) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            fn(x).backward(grad)

        return run

    steps = {name: step(fn) for name, fn in runs.items()}
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(_timed(fn, x.device) * 1e3)
    return {name: round(statistics.median(t), 1) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    assert _cpu.numba_kernels() is not None, "numba is needed to time the kernels"
    sizes = [2**k for k in range(8, 21, 2)]
    rows = []
    for rule, (shape_of, *runs) in _rules(args.p).items():
        for n in sizes:
            labelled = zip(("kernels", "torch ops", "torch layer"), runs, strict=True)
            named = {label: run for label, run in labelled if run is not None}
            us = measure(n, shape_of(n), named, args.repeats)
            rows.append({"rule": rule, "numel": n, "shape": shape_of(n), **us})
            print(rows[-1], flush=True)
    data = {"host": host_description(), **versions(), "threads": args.threads, "p": args.p, "rows": rows}
    lines = [
        "# CPU kernels against torch ops, forward + backward by size",
        "",
        f"- host: {data['host']}; threads {args.threads}; p = {args.p}; "
        f"medians of {args.repeats} interleaved runs",
        f"- {', '.join(f'{k} {v}' for k, v in versions().items())}",
        "- microseconds; 'torch ops' is the reference path the dispatch takes below its threshold, "
        "'torch layer' torch's own (nn.Dropout, nn.Dropout1d, or the randn formula for Gaussian noise)",
        "",
        "| rule | elements | shape | kernels us | torch ops us | torch layer us |",
        "|---|---:|---|---:|---:|---:|",
        *(
            f"| {r['rule']} | {r['numel']} | {'x'.join(map(str, r['shape']))} | {r.get('kernels', '-')} | "
            f"{r['torch ops']} | {r['torch layer']} |"
            for r in rows
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sizes.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "sizes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
