"""Time every layer of the package against its torch-native equivalent, side by side.

Run from the repository root: ``python -m benchmarks`` (``--help`` for options). Each
case pairs one of our layers with the torch way of doing the same thing; both run in
the same process, interleaved (ours, torch, ours, torch, ...), and the table reports
medians and the ratio torch / ours (above 1: ours is faster). Forward is timed without
autograd; forward + backward resets every ``.grad`` each iteration (accumulation would
add a pass that hides differences). Peak memory is what one forward + backward adds
above its inputs (torch.profiler's allocation events on CPU, the CUDA allocator's peak
on a GPU). Writes ``results/layers.md`` and ``results/layers.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import lightning_dropout
from lightning_dropout import DropConnectLinear, Dropout, Dropout1d, Dropout2d, Dropout3d, GaussianDropout

RESULTS = Path(__file__).parent / "results"
MB = 2**20


class TorchGaussianDropout(nn.Module):
    """Gaussian dropout the obvious torch way: ``x * (1 + sigma * randn_like(x))``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.sigma = math.sqrt(p / (1.0 - p))

    def forward(self, x: Tensor) -> Tensor:
        return x * (1.0 + self.sigma * torch.randn_like(x))


@dataclass
class Case:
    name: str
    shape: tuple[int, ...]
    ours: Callable[[], nn.Module]
    theirs: Callable[[], nn.Module]
    theirs_name: str
    repeats_scale: float = 1.0
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)


def cases(quick: bool) -> list[Case]:
    n = 2**20 if quick else 4 * 2**20
    batch = 32 if quick else 256
    return [
        Case("Dropout(p=0.5)", (n,), lambda: Dropout(0.5), lambda: nn.Dropout(0.5), "nn.Dropout(0.5)"),
        Case("Dropout(p=0.3)", (n,), lambda: Dropout(0.3), lambda: nn.Dropout(0.3), "nn.Dropout(0.3)"),
        Case("Dropout1d", (64, 256, n // (64 * 256)), Dropout1d, nn.Dropout1d, "nn.Dropout1d"),
        Case("Dropout2d", (64, 64, 32, n // (64 * 64 * 32)), Dropout2d, nn.Dropout2d, "nn.Dropout2d"),
        Case("Dropout3d", (16, 64, 16, 16, n // (16 * 64 * 256)), Dropout3d, nn.Dropout3d, "nn.Dropout3d"),
        Case(
            "GaussianDropout(p=0.5)",
            (n,),
            lambda: GaussianDropout(0.5),
            lambda: TorchGaussianDropout(0.5),
            "x * (1 + s * randn_like(x))",
        ),
        Case(
            "DropConnectLinear(1024, 1024)",
            (batch, 1024),
            lambda: DropConnectLinear(1024, 1024, p=0.5),
            lambda: nn.Linear(1024, 1024),
            "nn.Linear(1024, 1024)",
        ),
        Case(
            "DropConnectLinear(per_sample=True)",
            (batch, 1024),
            lambda: DropConnectLinear(1024, 1024, p=0.5, per_sample=True),
            lambda: nn.Linear(1024, 1024),
            "nn.Linear(1024, 1024)",
            repeats_scale=0.3,
        ),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(module: nn.Module, x: Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def _forward_backward(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return run


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak bytes (in MiB) that ``fn`` allocates above what is live when it starts."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MB
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak / MB


def measure(case: Case, device: torch.device, repeats: int) -> None:
    x = torch.randn(case.shape, device=device, requires_grad=True)
    modules = {"ours": case.ours().to(device).train(), "torch": case.theirs().to(device).train()}
    if isinstance(modules["ours"], nn.Linear) and isinstance(modules["torch"], nn.Linear):
        modules["torch"].load_state_dict(modules["ours"].state_dict())
    grad = torch.randn_like(modules["torch"](x))
    runs = {
        (who, kind): fn
        for who, module in modules.items()
        for kind, fn in (
            ("forward", _forward(module, x)),
            ("forward+backward", _forward_backward(module, x, grad)),
        )
    }
    for fn in runs.values():  # warm-up
        fn()
    case.results = {who: {"forward": [], "forward+backward": []} for who in modules}
    for _ in range(max(2, round(repeats * case.repeats_scale))):
        for (who, kind), fn in runs.items():  # interleaved: ours, torch, ours, torch
            case.results[who][kind].append(_timed(fn, device))
    for who, module in modules.items():
        x.grad = None  # so that freeing the last run's grads does not offset the peak
        module.zero_grad(set_to_none=True)
        case.peak_mb[who] = peak_memory_mb(runs[(who, "forward+backward")], device)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def report(all_cases: list[Case], meta: dict[str, object]) -> dict[str, object]:
    rows = []
    for case in all_cases:
        row: dict[str, object] = {
            "layer": case.name,
            "torch_equivalent": case.theirs_name,
            "shape": case.shape,
        }
        for kind in ("forward", "forward+backward"):
            ours = statistics.median(case.results["ours"][kind])
            theirs = statistics.median(case.results["torch"][kind])
            best_ours, best_theirs = min(case.results["ours"][kind]), min(case.results["torch"][kind])
            row[kind] = {
                "ours_ms": round(ours, 3),
                "torch_ms": round(theirs, 3),
                "speedup": round(theirs / ours, 2),
                "best_speedup": round(best_theirs / best_ours, 2),
                "runs": len(case.results["ours"][kind]),
            }
        row["peak_mb"] = {who: round(v, 1) for who, v in case.peak_mb.items()}
        rows.append(row)
    return {**meta, "rows": rows}


def markdown(data: dict[str, object]) -> str:
    lines = [
        "# Layer benchmarks: lightning-dropout vs torch-native",
        "",
        f"- device: {data['device']}; torch {data['torch']}; lightning-dropout {data['lightning_dropout']}; "
        f"python {data['python']}",
        f"- threads: {data['threads']}; repeats: {data['repeats']} (medians, interleaved in one process)",
        f"- host load average (1, 5, 15 min) at start {data['load_start']}, at end {data['load_end']}. "
        f"{data['note']}",
        "- speedup = torch median / our median (above 1: ours is faster); best = the same ratio of the "
        "fastest runs (least disturbed by other jobs). Peak = MiB one forward + backward allocates "
        "above its inputs.",
        "",
        "| layer | torch equivalent | shape | fwd ours ms | fwd torch ms | fwd speedup (best) "
        "| fwd+bwd ours ms | fwd+bwd torch ms | fwd+bwd speedup (best) | peak ours MiB | peak torch MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:  # type: ignore[attr-defined]
        f, fb = row["forward"], row["forward+backward"]
        shape = "x".join(str(s) for s in row["shape"])
        lines.append(
            f"| {row['layer']} | {row['torch_equivalent']} | {shape} | {f['ours_ms']} | {f['torch_ms']} | "
            f"{f['speedup']}x ({f['best_speedup']}x) | {fb['ours_ms']} | {fb['torch_ms']} | "
            f"{fb['speedup']}x ({fb['best_speedup']}x) | "
            f"{row['peak_mb']['ours']} | {row['peak_mb']['torch']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per measurement")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for layers.md / layers.json")
    parser.add_argument("--note", default="The host was shared with other jobs: ratios mean more than times.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    meta: dict[str, object] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "lightning_dropout": lightning_dropout.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_start": load_average(),
        "note": args.note,
    }
    selected = [c for c in cases(args.quick) if args.only is None or args.only in c.name]
    for case in selected:
        measure(case, device, args.repeats)
        fb = case.results
        print(
            f"{case.name}: fwd+bwd ours {statistics.median(fb['ours']['forward+backward']):.2f} ms, "
            f"torch {statistics.median(fb['torch']['forward+backward']):.2f} ms",
            flush=True,
        )
    meta["load_end"] = load_average()
    data = report(selected, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layers.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "layers.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
