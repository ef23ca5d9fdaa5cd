"""Time every layer of the package against its torch-native equivalent, side by side.

Run from the repository root: ``python -m benchmarks`` (``--help`` for options; under
a minute on a 2-core CPU). Each case pairs one of our layers with the torch way of
doing the same thing; both run in the same process, interleaved (ours, torch, ours,
torch, ...), and the table reports medians and the ratio torch / ours (above 1: ours is
faster) beside the case's target. Forward is timed without autograd; forward + backward
resets every ``.grad`` each iteration (accumulation would add a pass that hides
differences). Peak memory is what one forward + backward adds above its inputs
(torch.profiler's allocation events on CPU, the CUDA allocator's peak on a GPU). A
second table repeats some cases while a spinning process keeps one core busy. Writes
``results/layers.md`` and ``results/layers.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import lightning_dropout
from lightning_dropout import DropConnectLinear, Dropout, Dropout1d, Dropout2d, Dropout3d, GaussianDropout
from lightning_dropout.kernels import _cpu
from lightning_dropout.layers.drop_connect_layers import DEFAULT_MAX_MASK_BYTES

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
    target: float  # the least acceptable forward + backward speedup (torch / ours)
    target_text: str
    # never slower than torch: the forward alone must reach 1.0x as well
    never_slower: bool = True
    repeats_scale: float = 1.0
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)

    def verdict(self, forward: float, both: float) -> tuple[bool, str]:
        """Whether the target is met and, if not, the gap in words."""
        if both < self.target:
            return False, f"gap: {both}x against {self.target_text}"
        if self.never_slower and forward < 1.0:
            return False, f"gap: forward alone {forward}x (slower than torch)"
        return True, "met"


def cases(quick: bool) -> list[Case]:
    n = 2**20 if quick else 4 * 2**20
    batch = 32 if quick else 256
    linear = {"theirs": lambda: nn.Linear(1024, 1024), "theirs_name": "nn.Linear(1024, 1024)"}
    return [
        *(
            Case(
                f"Dropout(p={p})",
                (n,),
                lambda p=p: Dropout(p),
                lambda p=p: nn.Dropout(p),
                f"nn.Dropout({p})",
                4.0,
                ">= 4x",
            )
            for p in (0.5, 0.3, 0.1)
        ),
        Case(
            "Dropout1d",
            (64, 256, n // (64 * 256)),
            Dropout1d,
            nn.Dropout1d,
            "nn.Dropout1d",
            1.0,
            ">= 1.0x (aim 1.5x)",
        ),
        Case(
            "Dropout2d",
            (64, 64, 32, n // (64 * 64 * 32)),
            Dropout2d,
            nn.Dropout2d,
            "nn.Dropout2d",
            1.0,
            ">= 1.0x (aim 1.5x)",
        ),
        Case(
            "Dropout3d",
            (16, 64, 16, 16, n // (16 * 64 * 256)),
            Dropout3d,
            nn.Dropout3d,
            "nn.Dropout3d",
            1.0,
            ">= 1.0x (aim 1.5x)",
        ),
        Case(
            "GaussianDropout(p=0.5)",
            (n,),
            lambda: GaussianDropout(0.5),
            lambda: TorchGaussianDropout(0.5),
            "x * (1 + s * randn_like(x))",
            1.0,
            ">= 1.0x",
        ),
        Case(
            "DropConnectLinear(1024, 1024)",
            (batch, 1024),
            lambda: DropConnectLinear(1024, 1024, p=0.5),
            target=0.85,
            target_text=">= 0.85x",
            never_slower=False,
            **linear,
        ),  # type: ignore[arg-type]
        Case(
            "DropConnectLinear(per_sample=True)",
            (batch, 1024),
            lambda: DropConnectLinear(1024, 1024, p=0.5, per_sample=True),
            target=1 / 25,
            target_text="<= 25x slower (0.04x)",
            never_slower=False,
            repeats_scale=0.5,
            **linear,
        ),  # type: ignore[arg-type]
    ]


# Cases timed again while another process keeps one core busy.
BUSY_CASES = ("Dropout(p=0.5)", "Dropout2d", "GaussianDropout(p=0.5)")


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
    # Frees inside a Python-level op (an autograd Function) are folded into that op's
    # event: count them at its end, never before the allocations they follow.
    changes = sorted(
        (
            event.time_range.start if event.self_cpu_memory_usage > 0 else event.time_range.end,
            event.self_cpu_memory_usage,
        )
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


def host_description() -> str:
    """The CPU as ``lscpu`` names it (vendor, model, threads), else what platform knows."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in subprocess.run(
                ["lscpu"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            if ":" in line
        )
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} threads"
    vendor, model, threads = (fields.get(k, "?").strip() for k in ("Vendor ID", "Model name", "CPU(s)"))
    return f"{vendor} {model}, {threads} threads"


def versions() -> dict[str, str]:
    """The versions the figures depend on."""
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": _numba_version(),
        "cpu_kernels": "numba" if _cpu.numba_kernels() is not None else "torch ops",
        "lightning_dropout": lightning_dropout.__version__,
        "python": platform.python_version(),
    }


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
        met, verdict = case.verdict(row["forward"]["speedup"], row["forward+backward"]["speedup"])  # type: ignore[index]
        if case.name.endswith("per_sample=True)") and case.peak_mb:
            extra = case.peak_mb["ours"] - case.peak_mb["torch"]
            budget = DEFAULT_MAX_MASK_BYTES / MB
            met, verdict = (
                met and extra <= budget,
                f"{verdict}; peak +{extra:.0f} MiB (budget {budget:.0f} MiB)",
            )
        row["target"] = {"text": case.target_text, "met": met, "verdict": verdict}
        rows.append(row)
    return {**meta, "rows": rows}


def _table(rows: list[dict], targets: bool) -> list[str]:  # type: ignore[type-arg]
    lines = [
        "| layer | torch equivalent | shape | fwd ours / torch ms | fwd speedup (best) "
        "| fwd+bwd ours / torch ms | fwd+bwd speedup (best) | peak ours / torch MiB |"
        + (" target | met |" if targets else ""),
        "|---|---|---|---:|---:|---:|---:|---:|" + ("---|---|" if targets else ""),
    ]
    for row in rows:
        f, fb = row["forward"], row["forward+backward"]
        shape = "x".join(str(s) for s in row["shape"])
        line = (
            f"| {row['layer']} | {row['torch_equivalent']} | {shape} | {f['ours_ms']} / {f['torch_ms']} | "
            f"{f['speedup']}x ({f['best_speedup']}x) | {fb['ours_ms']} / {fb['torch_ms']} | "
            f"**{fb['speedup']}x** ({fb['best_speedup']}x) | "
            f"{row['peak_mb']['ours']} / {row['peak_mb']['torch']} |"
        )
        if targets:
            line += f" {row['target']['text']} | {row['target']['verdict']} |"
        lines.append(line)
    return lines


def markdown(data: dict[str, object]) -> str:
    lines = [
        "# Layer benchmarks: lightning-dropout vs torch-native",
        "",
        f"- device: {data['device']}; torch {data['torch']}; numpy {data['numpy']}; numba {data['numba']} "
        f"(CPU kernels: {data['cpu_kernels']}); lightning-dropout {data['lightning_dropout']}; "
        f"python {data['python']}",
        f"- threads: {data['threads']}; repeats: {data['repeats']} (medians, interleaved in one process); "
        f"run time {data['seconds']} s",
        f"- host load average (1, 5, 15 min) at start {data['load_start']}, at end {data['load_end']}. "
        f"{data['note']}",
        "- speedup = torch median / our median (above 1: ours is faster); best = the same ratio of the "
        "fastest runs (least disturbed by other jobs). Peak = MiB one forward + backward allocates "
        "above its inputs. A target is met when the forward + backward speedup reaches it and, for "
        "dropout layers, the forward alone is not slower than torch's.",
        "",
        *_table(data["rows"], targets=True),  # type: ignore[arg-type]
    ]
    if data.get("busy_rows"):
        lines += [
            "",
            "## With one core kept busy",
            "",
            "The same cases while another process spins on one core (a shared host, or data-loader "
            "workers, in miniature):",
            "",
            *_table(data["busy_rows"], targets=False),  # type: ignore[arg-type]
        ]
    return "\n".join(lines) + "\n"


def _measure_all(selected: list[Case], device: torch.device, repeats: int) -> None:
    for case in selected:
        measure(case, device, repeats)
        fb = case.results
        print(
            f"{case.name}: fwd+bwd ours {statistics.median(fb['ours']['forward+backward']):.2f} ms, "
            f"torch {statistics.median(fb['torch']['forward+backward']):.2f} ms",
            flush=True,
        )


def _numba_version() -> str:
    try:
        import numba
    except ImportError:
        return "not installed"
    return str(numba.__version__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--no-busy", action="store_true", help="skip the table with one core kept busy")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for layers.md / layers.json")
    parser.add_argument("--note", default="The host was shared with other jobs: ratios mean more than times.")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    meta: dict[str, object] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({host_description()})",
        **versions(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_start": load_average(),
        "note": args.note,
    }
    selected = [c for c in cases(args.quick) if args.only is None or args.only in c.name]
    _measure_all(selected, device, args.repeats)
    data = report(selected, meta)
    busy = [c for c in cases(args.quick) if c.name in BUSY_CASES and c.name in {s.name for s in selected}]
    if busy and not args.no_busy and device.type == "cpu":
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            _measure_all(busy, device, args.repeats)
        finally:
            spinner.kill()
            spinner.wait()
        data["busy_rows"] = report(busy, {})["rows"]
    data["load_end"] = load_average()
    data["seconds"] = round(time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layers.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "layers.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
