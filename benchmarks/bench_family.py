"""DropPath, DropBlock2d, LockedDropout, EmbeddingDropout and ConcreteDropout against the
implementations users run today, side by side on CPU.

    python benchmarks/bench_family.py [--repeats 9] [--threads 2] [--quick]

Pairs: timm's ``DropPath`` and ``DropBlock2d`` (timm imported without torchvision, as the
tests do), AWD-LSTM's ``LockedDropout`` and ``embedded_dropout`` (written out below as in
its repository), ``nn.Dropout`` for ConcreteDropout (what the relaxed mask costs over a
plain one), and for :func:`~lightning_dropout.layers.drop_path_residual` the plain
``x + drop_path(mlp(x))`` on a transformer MLP branch. Both sides of a pair run in the same
process, interleaved (ours, theirs, ours, theirs, ...); the tables report medians over
``--repeats`` runs of forward (no autograd) and forward + backward (every ``.grad``
reset), the ratio theirs / ours (above 1: ours is faster) and the peak memory one forward +
backward allocates above its inputs. It also records how much of each map DropBlock
drops at p = 0.1, ours and timm's. Writes ``results/family.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_dropout as ld
from benchmarks.run import load_average, peak_memory_mb
from tests._models import import_timm

RESULTS = Path(__file__).resolve().parent / "results"
Run = Callable[[], Tensor]


class AWDLockedDropout(nn.Module):
    """AWD-LSTM's LockedDropout (salesforce/awd-lstm-lm, locked_dropout.py), batch-first."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)
        return mask * x


def awd_embedded_dropout(embed: nn.Embedding, words: Tensor, p: float) -> Tensor:
    """AWD-LSTM's embedded_dropout (embed_regularize.py): mask a copy of the whole weight."""
    mask = embed.weight.new_empty((embed.weight.size(0), 1)).bernoulli_(1 - p).expand_as(embed.weight) / (
        1 - p
    )
    return F.embedding(words, mask * embed.weight, embed.padding_idx)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def pair_of_modules(ours: nn.Module, theirs: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    x = torch.randn(shape, requires_grad=True)
    return {
        "ours": (lambda: ours(x), [x]),
        "theirs": (lambda: theirs(x), [x]),
    }


def residual_case(timm: Any, p: float, mlp: nn.Module, tokens: Tensor) -> dict[str, Any]:
    """The branch computed only for kept samples, against the branch for every sample."""
    ours, theirs = ld.DropPath(p), timm.layers.DropPath(p)
    leaves = [tokens, *mlp.parameters()]
    return {
        "ours": (lambda: ours.residual(tokens, mlp), leaves),
        "theirs": (lambda: tokens + theirs(mlp(tokens)), leaves),
        "theirs_name": f"x + timm DropPath({p})(mlp(x)), mlp 256-1024-256 on {tuple(tokens.shape)} tokens",
    }


def cases(quick: bool) -> dict[str, dict[str, Any]]:
    timm = import_timm()
    small = 4 if quick else 1
    vocabulary, dim = 33_278, 400  # AWD-LSTM on WikiText-2
    embed = nn.Embedding(vocabulary, dim)
    ours_embed = ld.EmbeddingDropout(embed, 0.1)
    words = torch.randint(0, vocabulary, (80 // small, 70))
    mlp = Mlp(256, 1024)
    tokens = torch.randn(64 // small, 64, 256, requires_grad=True)
    image = (64 // small, 256, 14, 14)
    return {
        "DropPath(0.1) vs timm DropPath": {
            **pair_of_modules(ld.DropPath(0.1), timm.layers.DropPath(0.1), (128 // small, 197, 192)),
            "theirs_name": "timm.layers.DropPath(0.1)",
        },
        "DropBlock2d(0.1, 7, share_channels=True) vs timm DropBlock2d": {
            **pair_of_modules(
                ld.DropBlock2d(0.1, 7, share_channels=True), timm.layers.DropBlock2d(0.1, 7), image
            ),
            "theirs_name": "timm DropBlock2d(0.1, 7) (couple_channels=True)",
        },
        "DropBlock2d(0.1, 7) per channel vs timm couple_channels=False": {
            **pair_of_modules(
                ld.DropBlock2d(0.1, 7), timm.layers.DropBlock2d(0.1, 7, couple_channels=False), image
            ),
            "theirs_name": "timm DropBlock2d(0.1, 7, couple_channels=False)",
        },
        "LockedDropout(0.3) vs AWD-LSTM LockedDropout": {
            **pair_of_modules(ld.LockedDropout(0.3), AWDLockedDropout(0.3), (80 // small, 70, 400)),
            "theirs_name": "AWD-LSTM LockedDropout (bernoulli_ mask, multiply)",
        },
        "EmbeddingDropout(0.1) vs AWD-LSTM embedded_dropout": {
            "ours": (lambda: ours_embed(words), [embed.weight]),
            "theirs": (lambda: awd_embedded_dropout(embed, words, 0.1), [embed.weight]),
            "theirs_name": f"AWD-LSTM embedded_dropout (masked copy of {vocabulary}x{dim})",
        },
        "ConcreteDropout(0.1) vs nn.Dropout(0.1)": {
            **pair_of_modules(ld.ConcreteDropout(0.1), nn.Dropout(0.1), (128 // small, 197, 192)),
            "theirs_name": "nn.Dropout(0.1) (a fixed p)",
        },
        **{
            f"DropPath({p}).residual vs x + DropPath(mlp(x))": residual_case(timm, p, mlp, tokens)
            for p in (0.1, 0.25, 0.5)
        },
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs: dict[tuple[str, str], Callable[[], object]] = {}
    for who in ("ours", "theirs"):
        forward, leaves = case[who]

        def no_grad(forward: Run = forward) -> None:
            with torch.no_grad():
                forward()

        def both(forward: Run = forward, leaves: list[Tensor] = leaves) -> None:
            for leaf in leaves:
                leaf.grad = None
            out = forward()
            out.backward(torch.ones_like(out))

        runs[(who, "forward")], runs[(who, "forward+backward")] = no_grad, both
    for fn in runs.values():  # warm-up
        fn()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():  # interleaved
            times[key].append(timed(fn))
    row: dict[str, Any] = {"theirs": case["theirs_name"]}
    for kind in ("forward", "forward+backward"):
        ours, theirs = statistics.median(times[("ours", kind)]), statistics.median(times[("theirs", kind)])
        row[kind] = {
            "ours_ms": round(ours, 2),
            "theirs_ms": round(theirs, 2),
            "ratio": round(theirs / ours, 2),
        }
    row["peak_mb"] = {}
    for who in ("ours", "theirs"):
        for leaf in case["ours"][1] + case["theirs"][1]:
            leaf.grad = None  # freeing the last run's grads inside the measurement would offset its peak
        row["peak_mb"][who] = round(peak_memory_mb(runs[(who, "forward+backward")], torch.device("cpu")), 1)
    return row


def drop_block_fractions(quick: bool) -> list[dict[str, Any]]:
    """The fraction of positions each DropBlock drops at p = 0.1, over many maps."""
    timm = import_timm()
    torch.manual_seed(0)
    rows = []
    for size, block in ((14, 7), (7, 7), (28, 3), (9, 4)):
        x = torch.ones(256 if quick else 2048, 8, size, size)
        ours = (ld.DropBlock2d(0.1, block)(x) == 0).double().mean().item()
        theirs = (timm.layers.DropBlock2d(0.1, block, couple_channels=False)(x) == 0).double().mean().item()
        rows.append(
            {"map": f"{size}x{size}", "block": block, "ours": round(ours, 4), "timm": round(theirs, 4)}
        )
    return rows


def environment(threads: int, repeats: int) -> dict[str, Any]:
    timm = import_timm()
    return {
        "device": f"CPU {platform.machine()}",
        "threads": threads,
        "repeats": repeats,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning_dropout": ld.__version__,
    }


def markdown(env: dict[str, Any], rows: dict[str, dict[str, Any]], fractions: list[dict[str, Any]]) -> str:
    lines = [
        "# The rest of the dropout family against timm and AWD-LSTM (CPU)",
        "",
        "Produced by `benchmarks/bench_family.py`: medians of interleaved runs in one process; "
        "ratio = theirs / ours (above 1: ours is faster); peak = MiB one forward + backward "
        "allocates above its inputs. For `DropPath(p).residual` the ideal ratio is 1 / (1 - p), "
        "the share of the branch it skips.",
        "",
        "| ours | theirs | fwd ours ms | fwd theirs ms | fwd ratio | fwd+bwd ours ms | fwd+bwd theirs ms "
        "| fwd+bwd ratio | peak ours MiB | peak theirs MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        f, fb = row["forward"], row["forward+backward"]
        lines.append(
            f"| {name.split(' vs ')[0]} | {row['theirs']} | {f['ours_ms']} | {f['theirs_ms']} "
            f"| {f['ratio']}x | {fb['ours_ms']} | {fb['theirs_ms']} | {fb['ratio']}x "
            f"| {row['peak_mb']['ours']} | {row['peak_mb']['theirs']} |"
        )
    lines += [
        "",
        "Fraction of positions DropBlock drops at p = 0.1 (one mask per channel, 8 channels per map):",
        "",
        "| map | block | ours | timm |",
        "|---|---:|---:|---:|",
        *(f"| {r['map']} | {r['block']} | {r['ours']} | {r['timm']} |" for r in fractions),
        "",
        "Machine and versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a smoke test")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = {**environment(args.threads, args.repeats), "load_start": load_average()}
    rows = {}
    for name, case in cases(args.quick).items():
        rows[name] = bench(case, args.repeats)
        print(name, rows[name], flush=True)
    fractions = drop_block_fractions(args.quick)
    env["load_end"] = load_average()
    if args.quick:
        print(markdown(env, rows, fractions))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "family.json").write_text(json.dumps({**env, "rows": rows, "drop_block": fractions}, indent=2))
    (RESULTS / "family.md").write_text(markdown(env, rows, fractions))


if __name__ == "__main__":
    main()
