"""What dropout sites cost: discovery, a training step, Monte-Carlo inference, a probe.

Measured on tiny random-weight builds of real models (the test suite's, ``tests/_models.py``)
in one process, interleaved, medians of ``--repeats`` runs:

- discovery: ``find_sites`` on a model, the first time (its classes' code is read) and
  again (cached);
- training step: a plain forward + backward + SGD step, beside the same step with the work
  ``DropoutScheduler`` adds to every step (its ``on_train_batch_start``);
- whole fits: Lightning fits without a package callback, with a scheduler, and with
  ``PerRankDropout`` (what ``DropoutMixin`` adds by default);
- MC: ``mc_predict`` (30 samples, batched) on timm's ViT whose attention dropout sits inside
  ``scaled_dot_product_attention`` (reached by switching the attention module's flag),
  beside the same model computing attention with its dropout module (``fused_attn=False``),
  and beside a hand-written MC loop over the fused model with the flags set once;
- probe: a forward of BART (eager attention) with a ``FunctionalProbe`` open, as on a
  ``DropRateMonitor`` measured step, beside a plain forward.

    python benchmarks/bench_sites.py      # writes benchmarks/results/sites_overhead.{md,json}
    python benchmarks/bench_sites.py --repeats 5 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_dropout.callbacks import DropoutScheduler  # noqa: E402
from lightning_dropout.mc import mc_predict, replicate  # noqa: E402
from lightning_dropout.schedules import Linear  # noqa: E402
from lightning_dropout.sites import FunctionalProbe, find_sites, sites_training  # noqa: E402
from lightning_dropout.sites import code as site_code  # noqa: E402
from tests import _models  # noqa: E402  (tiny builds; timm imported without torchvision)

sys.path.insert(0, str(Path(__file__).parent))
from bench_mc import environment as mc_environment  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs interleaved (order rotated every round)."""
    for run in runs.values():
        run()  # warm-up
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def models() -> dict[str, Callable[[], nn.Module]]:
    return {
        "timm ViT (2 blocks)": lambda: _models.timm_vit(
            drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1
        ),
        "BERT (2 layers, sdpa)": lambda: _models.Logits(_models.hf_model("bert", "sdpa")),
        "BART (2+2 layers, eager)": lambda: _models.Logits(_models.hf_model("bart", "eager")),
        "Llama (2 layers, sdpa)": lambda: _models.Logits(
            _models.hf_model("llama", "sdpa", attention_dropout=0.1)
        ),
    }


def bench_discovery(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, build in models().items():
        model = build()
        site_code._CACHE.clear()
        start = time.perf_counter()
        sites = find_sites(model)
        first = time.perf_counter() - start
        cached = interleaved({"cached": lambda m=model: find_sites(m)}, repeats)["cached"]
        rows.append({"model": name, "sites": len(sites), "first_ms": first * 1e3, "cached_ms": cached * 1e3})
    return rows


def bench_training_step(repeats: int) -> list[dict[str, Any]]:
    return [training_step_row(name, build, repeats) for name, build in list(models().items())[:2]]


def training_step_row(name: str, build: Callable[[], nn.Module], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().train()
    x = torch.randn(8, *_models.IMAGE) if "ViT" in name else _models.hf_input("bert", 8, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scheduler = DropoutScheduler(Linear(0.0, 0.2, steps=1000))  # a new p at every step
    step_index = iter(range(10**9))
    # The trainer as the hooks read it: the step index, no logger.
    trainer = SimpleNamespace(global_step=0, current_epoch=0, loggers=[])
    scheduler.on_fit_start(trainer, model)  # type: ignore[arg-type]

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        optimizer.step()

    def hook() -> None:
        trainer.global_step = next(step_index)
        scheduler.on_train_batch_start(trainer, model, x, batch_idx=1)  # type: ignore[arg-type]

    def scheduled() -> None:
        hook()
        plain()

    medians = interleaved({"plain": plain, "scheduled": scheduled, "hook": hook}, repeats)
    return {
        "model": name,
        "plain_ms": medians["plain"] * 1e3,
        "scheduled_ms": medians["scheduled"] * 1e3,
        "hook_us": medians["hook"] * 1e6,
        "hook_share_percent": 100 * medians["hook"] / medians["plain"],
    }


def bench_fit(repeats: int, steps: int = 300) -> dict[str, Any]:
    """Whole fits of BERT (2 layers, sdpa; batch 8 x 32 tokens, CSV logger): no package
    callback, a DropoutScheduler (a new p every step), and PerRankDropout (what
    DropoutMixin adds by default), interleaved."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_dropout.callbacks import PerRankDropout

    class Wrapped(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.net(batch).float().pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    batches = [_models.hf_input("bert", 8, 32) for _ in range(steps)]
    callbacks: dict[str, Callable[[], list[pl.Callback]]] = {
        "none": list,
        "scheduler": lambda: [DropoutScheduler(Linear(0.0, 0.2, steps=steps))],
        "per_rank": lambda: [PerRankDropout()],
    }

    def fit(name: str) -> None:
        torch.manual_seed(0)
        model = Wrapped(_models.Logits(_models.hf_model("bert", "sdpa")))
        trainer = pl.Trainer(
            max_steps=steps,
            logger=CSVLogger(str(RESULTS / ".fit_logs")),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=callbacks[name](),
        )
        trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))

    medians = interleaved({name: lambda n=name: fit(n) for name in callbacks}, repeats)
    return {
        "model": f"BERT (2 layers, sdpa), {steps} steps of batch 8 x 32 tokens",
        **{f"{name}_ms_per_step": medians[name] / steps * 1e3 for name in callbacks},
        "scheduler_over_none": medians["scheduler"] / medians["none"],
        "per_rank_over_none": medians["per_rank"] / medians["none"],
    }


def bench_mc(repeats: int, n_samples: int) -> dict[str, Any]:
    torch.manual_seed(0)
    fused = _models.timm_vit(fused_attn=True, attn_drop_rate=0.1, proj_drop_rate=0.1).eval()
    unfused = _models.timm_vit(fused_attn=False, attn_drop_rate=0.1, proj_drop_rate=0.1).eval()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(8, *_models.IMAGE)
    sites = find_sites(fused)

    def by_hand() -> torch.Tensor:
        # What a user writes knowing the model: flags set once, replicas in one call.
        with torch.no_grad(), sites_training(fused, sites):
            return fused(replicate(x, n_samples)).softmax(-1).reshape(n_samples, 8, -1).mean(0)

    medians = interleaved(
        {
            "fused": lambda: mc_predict(fused, x, n_samples=n_samples),
            "unfused": lambda: mc_predict(unfused, x, n_samples=n_samples),
            "by_hand": by_hand,
        },
        repeats,
    )
    return {
        "model": "timm ViT (2 blocks, dim 32), batch 8",
        "n_samples": n_samples,
        "sdpa_gate_ms": medians["fused"] * 1e3,
        "module_call_ms": medians["unfused"] * 1e3,
        "by_hand_ms": medians["by_hand"] * 1e3,
        "sdpa_gate_over_module_call": medians["fused"] / medians["unfused"],
        "mc_predict_over_by_hand": medians["fused"] / medians["by_hand"],
    }


def bench_probe(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _models.Logits(_models.hf_model("bart", "eager")).train()
    x = _models.hf_input("bart", 8, 32)
    sites = find_sites(model)

    def probed() -> None:
        with FunctionalProbe(sites, lambda site, inp: None):
            model(x)

    medians = interleaved({"plain": lambda: model(x), "probed": probed}, repeats)
    return {
        "model": "BART (2+2 layers, eager), batch 8 x 32 tokens, forward",
        "plain_ms": medians["plain"] * 1e3,
        "probed_ms": medians["probed"] * 1e3,
        "ratio": medians["probed"] / medians["plain"],
    }


def environment() -> dict[str, object]:
    """bench_mc's environment, with the model libraries' versions."""
    timm, transformers = _models.import_timm(), _models.transformers()
    return {**mc_environment(), "timm": timm.__version__, "transformers": transformers.__version__}


def markdown(env: dict[str, object], results: dict[str, Any]) -> str:
    lines = [
        "# What dropout sites cost",
        "",
        "`benchmarks/bench_sites.py` (see its docstring for the method).",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        "",
        "## Discovery (`find_sites`)",
        "",
        "| model | sites | first call ms | cached ms |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['sites']} | {r['first_ms']:.1f} | {r['cached_ms']:.2f} |"
        for r in results["discovery"]
    ]
    lines += [
        "",
        "## A training step with the scheduler's per-step work",
        "",
        "| model | plain step ms | scheduled step ms | scheduler hook us | hook / step |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['plain_ms']:.2f} | {r['scheduled_ms']:.2f} | {r['hook_us']:.0f} "
        f"| {r['hook_share_percent']:.2f}% |"
        for r in results["training_step"]
    ]
    fit = results["fit"]
    lines += [
        "",
        "## Whole fits",
        "",
        f"{fit['model']}, CSV logger, medians of interleaved fits:",
        "",
        "| callbacks | ms per step | against none |",
        "|---|---:|---:|",
        f"| none | {fit['none_ms_per_step']:.2f} | 1.00x |",
        f"| `DropoutScheduler` (a new p every step) | {fit['scheduler_ms_per_step']:.2f} "
        f"| {fit['scheduler_over_none']:.3f}x |",
        f"| `PerRankDropout` (DropoutMixin's default) | {fit['per_rank_ms_per_step']:.2f} "
        f"| {fit['per_rank_over_none']:.3f}x |",
    ]
    mc = results["mc"]
    lines += [
        "",
        "## Monte-Carlo inference with attention dropout inside scaled_dot_product_attention",
        "",
        f"{mc['model']}, {mc['n_samples']} samples, batched.",
        "",
        "| attention dropout | ms |",
        "|---|---:|",
        f"| inside SDPA, reached by the attention's flag (`mc_predict`) | {mc['sdpa_gate_ms']:.2f} |",
        f"| a module call (`fused_attn=False`, `mc_predict`) | {mc['module_call_ms']:.2f} |",
        f"| inside SDPA, flags set by hand once (no `mc_predict`) | {mc['by_hand_ms']:.2f} |",
        "",
        f"SDPA gate / module call: **{mc['sdpa_gate_over_module_call']:.2f}x**; "
        f"`mc_predict` / by hand: **{mc['mc_predict_over_by_hand']:.2f}x**.",
    ]
    probe = results["probe"]
    lines += [
        "",
        "## A forward with the functional probe open (DropRateMonitor's measured steps only)",
        "",
        f"{probe['model']}: {probe['plain_ms']:.2f} ms plain, {probe['probed_ms']:.2f} ms probed "
        f"({probe['ratio']:.2f}x).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--n-samples", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    results = {
        "discovery": bench_discovery(args.repeats),
        "training_step": bench_training_step(args.repeats),
        "fit": bench_fit(max(3, args.repeats // 5)),
        "mc": bench_mc(args.repeats, args.n_samples),
        "probe": bench_probe(args.repeats),
    }
    env["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sites_overhead.json").write_text(json.dumps({"environment": env, **results}, indent=2))
        (RESULTS / "sites_overhead.md").write_text(markdown(env, results))


if __name__ == "__main__":
    main()
