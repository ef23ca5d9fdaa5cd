"""What observing attention dropout inside ``scaled_dot_product_attention`` costs.

On a ``DropRateMonitor`` measured step the :class:`~lightning_dropout.sites.FunctionalProbe`
evaluates every ``scaled_dot_product_attention`` call made for a watched site in math form
(scores, softmax, dropout with the same p, times the values), so that its drops can be
counted. This times a training step (forward + backward) of a random-weight transformers
BERT with ``attn_implementation="sdpa"`` three ways, interleaved in one process, medians of
``--repeats`` runs:

- plain: no probe (every unmeasured step);
- measured: the probe open with ``DropRateMonitor``'s observer (a measured step);
- eager: the same model with eager attention and no probe (what attention costs written
  out by transformers itself).

    python benchmarks/bench_sdpa_realised.py   # writes benchmarks/results/sdpa_realised.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_dropout.callbacks import DropRateMonitor  # noqa: E402
from lightning_dropout.metrics import DropRate  # noqa: E402
from lightning_dropout.sites import FunctionalProbe, find_sites  # noqa: E402
from tests import _models  # noqa: E402

SHAPES = {  # name: (hidden, heads, layers, batch, tokens)
    "BERT 2x32, batch 8 x 32 tokens": (32, 2, 2, 8, 32),
    "BERT 4x256, batch 8 x 128 tokens": (256, 4, 4, 8, 128),
    "BERT 4x256, batch 4 x 512 tokens": (256, 4, 4, 4, 512),
}


def bert(hidden: int, heads: int, layers: int, attention: str) -> torch.nn.Module:
    hf = _models.transformers()
    config = hf.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        vocab_size=_models.VOCAB,
        max_position_embeddings=512,
        attention_probs_dropout_prob=0.1,
        hidden_dropout_prob=0.1,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    return hf.BertForSequenceClassification(config).train()


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids).logits.float().pow(2).mean().backward()


def timed(run: Any) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def measure(name: str, shape: tuple[int, int, int, int, int], repeats: int) -> dict[str, Any]:
    hidden, heads, layers, batch, tokens = shape
    sdpa, eager = bert(hidden, heads, layers, "sdpa"), bert(hidden, heads, layers, "eager")
    ids = torch.randint(3, _models.VOCAB, (batch, tokens))
    sites = find_sites(sdpa)
    monitor = DropRateMonitor()  # its sites and metrics, as its setup makes them
    monitor.sites, monitor._rates = sites, {name: DropRate() for name in sites}

    def measured() -> None:
        with FunctionalProbe(sites, monitor._observe):
            step(sdpa, ids)

    runs = {"plain": lambda: step(sdpa, ids), "measured": measured, "eager": lambda: step(eager, ids)}
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(timed(run))
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "model": name,
        **{f"{key}_ms": round(value, 2) for key, value in medians.items()},
        "measured_over_plain": round(medians["measured"] / medians["plain"], 2),
        "eager_over_plain": round(medians["eager"] / medians["plain"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    rows = [measure(name, shape, args.repeats) for name, shape in SHAPES.items()]
    env = {
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg()[0],
        "device": f"CPU, {os.cpu_count()} logical cores (shared), torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "repeats": args.repeats,
    }
    lines = [
        "# Observing attention dropout inside scaled_dot_product_attention",
        "",
        "`benchmarks/bench_sdpa_realised.py` (see its docstring for the method).",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "Training step (forward + backward), medians of interleaved runs:",
        "",
        "| model | plain ms | measured step ms | eager attention ms | measured / plain | eager / plain |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {r['model']} | {r['plain_ms']} | {r['measured_ms']} | {r['eager_ms']} | "
            f"{r['measured_over_plain']}x | {r['eager_over_plain']}x |"
            for r in rows
        ],
    ]
    print("\n".join(lines))
    if not args.no_write:
        out = ROOT / "benchmarks" / "results"
        (out / "sdpa_realised.md").write_text("\n".join(lines) + "\n")
        record = {"environment": env, "rows": rows}
        (out / "sdpa_realised.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
