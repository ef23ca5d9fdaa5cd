"""The demo's outputs: tables (mean ± sd over seeds), the PNGs and ``report.md``."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lightning_dropout.demo.autoencoder import AutoencoderResult
from lightning_dropout.demo.experiments import CNN_P, MLP_P, DemoConfig
from lightning_dropout.demo.figures import feature_grid, grid_of, histogram, titled_row
from lightning_dropout.demo.measure import RunResult
from lightning_dropout.demo.run import CLASSIFIER_VAL_SIZE, DemoResult

FIGURE7 = "figure7_features.png"
FIGURE8 = "figure8_activations.png"
DIGITS = 1797


def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± sd"`` (sample standard deviation); a single value alone.

    Example:
        >>> mean_sd([0.01, 0.02, 0.03])
        '0.020 ± 0.010'
        >>> mean_sd([0.5])
        '0.500'
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def by_model(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped by model name, in first-seen order, each group ordered by seed."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.model, []).append(run)
    return {name: sorted(group, key=lambda r: r.seed) for name, group in groups.items()}


def baseline_of(model: str) -> str:
    """The run without dropout that ``model`` is compared with (same family, same seed).

    Example:
        >>> baseline_of("cnn_spatial_dropout")
        'cnn_no_dropout'
    """
    return model.split("_", 1)[0] + "_no_dropout"


def _paired(
    group: list[RunResult], baseline: dict[int, RunResult], metric: Callable[[RunResult], float]
) -> str:
    pairs = [(run, baseline[run.seed]) for run in group if run.seed in baseline]
    if not pairs or all(run is base for run, base in pairs):
        return "-"
    return mean_sd([metric(run) - metric(base) for run, base in pairs])


def classifier_table(runs: Sequence[RunResult]) -> str:
    """Test error, test NLL and the NLL gap per model, with the paired differences from
    the model's no-dropout baseline, as mean ± sd over seeds (GitHub markdown)."""
    groups = by_model(runs)
    rows = []
    for name, group in groups.items():
        baseline = {run.seed: run for run in groups.get(baseline_of(name), [])}
        rows.append(
            [
                name,
                mean_sd([r.test_error for r in group]),
                _paired(group, baseline, lambda r: r.test_error),
                mean_sd([r.test_nll for r in group]),
                _paired(group, baseline, lambda r: r.test_nll),
                mean_sd([r.nll_gap for r in group]),
            ]
        )
    header = ["model", "test error", "Δ error", "test NLL", "Δ NLL", "NLL gap (test - train)"]
    return _table(header, rows)


def units_table(runs: Sequence[RunResult]) -> str:
    """Per hidden layer: co-adaptation, sparsity and mean activation on the test set
    (mean ± sd over seeds), and the dropout layer's p beside the rate it realised."""
    rows = []
    for name, group in by_model(runs).items():
        for index, layer in enumerate(group[0].layers):
            layers = [run.layers[index] for run in group]
            if layer.p is None or layer.realised is None:
                drop = "-"
            else:
                drop = f"{layer.p:.2f} / {statistics.fmean(lay.realised or 0.0 for lay in layers):.3f}"
            rows.append(
                [
                    name if index == 0 else "",
                    layer.name,
                    mean_sd([lay.mean_abs_corr for lay in layers]),
                    mean_sd([lay.sparsity for lay in layers]),
                    mean_sd([lay.mean_activation for lay in layers]),
                    drop,
                ]
            )
    header = ["model", "layer", "mean abs corr", "sparsity", "mean activation", "p / realised drop"]
    return _table(header, rows)


def autoencoder_table(results: Sequence[AutoencoderResult]) -> str:
    """Figure 7 and 8's numbers for each autoencoder, on held-out digits."""
    rows = [
        [
            result.model,
            f"{result.p:g}",
            f"{result.test_loss:.4f}",
            f"{float(result.mean_activation.mean()):.3f}",
            f"{result.sparsity:.3f}",
            f"{result.mean_abs_corr:.3f}",
            f"{result.peak_share:.2f}",
            str(result.dead_units),
        ]
        for result in results
    ]
    header = [
        "model",
        "p",
        "test BCE",
        "mean activation",
        "sparsity",
        "mean abs corr",
        "peak share",
        "dead units",
    ]
    return _table(header, rows)


def write_figures(results: Sequence[AutoencoderResult], out: Path) -> list[Path]:
    """Figure 7 (the feature grids side by side) and Figure 8 (per model, the histograms of
    mean activations and of activations, on shared axes) as PNGs in ``out``."""
    titles = [_label(result) for result in results]
    grids = [feature_grid(result.features, alive=result.mean_activation > 0) for result in results]
    figure7 = titled_row(grids, titles)
    top_mean = max(float(r.mean_activation.max()) for r in results)
    top_act = max(float(r.activations.max()) for r in results)
    panels = []
    for result, title in zip(results, titles, strict=True):
        panels.append(
            histogram(
                result.mean_activation,
                f"{title}: mean activation of each unit",
                "mean activation",
                value_range=(0.0, top_mean),
            )
        )
        panels.append(
            histogram(
                result.activations, f"{title}: all activations", "activation", value_range=(0.0, top_act)
            )
        )
    figure8 = grid_of(panels, columns=2)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / FIGURE7, out / FIGURE8]
    figure7.save(paths[0])
    figure8.save(paths[1])
    return paths


def _label(result: AutoencoderResult) -> str:
    return f"dropout p = {result.p:g}" if result.p > 0 else "no dropout"


def tensorboard_command(out: str | Path) -> str:
    """The exact command that opens the demo's dashboard (the tensorboard beside this
    Python, so it works from the demo's virtual environment without activating it)."""
    beside = Path(sys.executable).parent / "tensorboard"
    program = str(beside) if beside.exists() else "tensorboard"
    return f"{program} --logdir {Path(out).resolve()} --host 127.0.0.1 --port 6006"


def versions() -> str:
    """torch, Lightning and Python versions, for the report."""
    import lightning

    return f"torch {torch.__version__}, Lightning {lightning.__version__}, Python {sys.version.split()[0]}"


def describe_regime(config: DemoConfig) -> str:
    """What was trained, on which split, for how long (one markdown paragraph)."""
    test_size = DIGITS - config.train_size - CLASSIFIER_VAL_SIZE
    return (
        f"Classifiers: {config.train_size} training digits, {CLASSIFIER_VAL_SIZE} validation digits "
        f"(logged only, nothing is selected on them) and {test_size} test digits, drawn anew for each "
        f"seed ({', '.join(map(str, config.seed_list))}); {config.max_epochs} epochs of Adam (lr 1e-3, "
        f"batch 64). MLP 64-{config.width}-{config.width}-10 without dropout and with dropout scheduled "
        f"from 0 to {MLP_P} over the first 30% of training; CNN (two 3x3 convolutions, 16 and 32 "
        f"channels) without dropout, with element dropout and with SpatialDropout, both p = {CNN_P}. "
        f"Autoencoders 64-256-64 (ReLU, tied weights, sigmoid and binary cross-entropy) without and "
        f"with dropout p = 0.5 on the hidden units, {config.autoencoder_epochs} epochs of batch 128 on "
        f"1297 digits, measured on 250 held-out digits (seed {config.seed})."
    )


def report_markdown(result: DemoResult) -> str:
    """``report.md``: the regime, the pictures, the three tables and the dashboard command."""
    config = result.config
    parts = [
        "# lightning-dropout demo",
        describe_regime(config),
        f"{len(result.autoencoders) + len(result.runs)} runs, {result.fit_seconds:.0f} s in `trainer.fit` "
        f"({config.threads} torch thread{'s' if config.threads > 1 else ''}); {versions()}.",
        "## Figures 7 and 8: autoencoders",
        f"![Figure 7: features without and with dropout]({FIGURE7})",
        f"![Figure 8: mean activations and activations without and with dropout]({FIGURE8})",
        autoencoder_table(result.autoencoders),
        "Peak share: median over live units of the share of a feature's squared weights on its "
        "strongest pixel (1: a single pixel; 1/64: spread evenly). Dead units never fire on the "
        "held-out digits.",
        f"## Classifiers: mean ± sd over {config.seeds} seed{'s' if config.seeds > 1 else ''}",
        classifier_table(result.runs),
        "Δ: the paired difference from the same seed's model without dropout (same split and "
        "data order). NLL: mean negative log-likelihood in nats, in evaluation mode.",
        units_table(result.runs),
        "Measured on the test digits in evaluation mode; realised drop: the fraction of a dropout "
        "layer's nonzero inputs it zeroed in one training-mode pass.",
        "## Dashboard",
        f"```\n{tensorboard_command(config.out)}\n```",
    ]
    return "\n\n".join(parts) + "\n"


def write_outputs(result: DemoResult) -> list[Path]:
    """The Figure 7 and 8 PNGs and ``report.md`` in the output folder; their paths."""
    out = Path(result.config.out)
    paths = write_figures(result.autoencoders, out) if result.autoencoders else []
    report = out / "report.md"
    report.write_text(report_markdown(result), encoding="utf-8")
    return [*paths, report]
