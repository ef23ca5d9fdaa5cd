"""The ``lightning-dropout`` console script: ``lightning-dropout demo [options]``."""

from __future__ import annotations

import argparse
import sys
import time


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    """The console script's argument parser."""
    parser = argparse.ArgumentParser(prog="lightning-dropout", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="reproduce Srivastava et al.'s Figures 7 and 8 and compare dropout over seeds on digits",
        description="On scikit-learn's bundled handwritten digits (no download): train autoencoders "
        "without and with dropout (Figures 7 and 8 of Srivastava et al. 2014), then MLPs and CNNs "
        "without dropout, with scheduled, element and spatial dropout over several seeds; log "
        "everything to TensorBoard, write the PNGs and report.md, and print mean ± sd tables.",
    )
    demo.add_argument("--max-epochs", type=int, default=60, help="epochs per classifier (default 60)")
    demo.add_argument(
        "--seeds", type=int, default=3, help="seeds per classifier, each its own split (default 3)"
    )
    demo.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    demo.add_argument("--out", default="runs", help="output folder: logs, PNGs, report.md (default ./runs)")
    demo.add_argument("--ae-epochs", type=int, default=300, help="epochs per autoencoder (default 300)")
    demo.add_argument(
        "--train-size", type=int, default=300, help="training digits of the classifiers (default 300)"
    )
    demo.add_argument("--width", type=int, default=1024, help="hidden units of the MLPs (default 1024)")
    demo.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: fastest for these small models)"
    )
    demo.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    demo.add_argument("--devices", type=_devices, default=1, help="devices per run (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the console script with ``argv`` (default: the process arguments).

    Raises:
        SystemExit: on bad arguments (argparse prints the error).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("max_epochs", "seeds", "ae_epochs", "width", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    # Imported here so `lightning-dropout --help` answers at once.
    from lightning_dropout.demo import (
        DemoConfig,
        autoencoder_table,
        classifier_table,
        run_demo,
        tensorboard_command,
        units_table,
        write_outputs,
    )
    from lightning_dropout.demo.report import DIGITS
    from lightning_dropout.demo.run import CLASSIFIER_VAL_SIZE

    if not 1 <= args.train_size < DIGITS - CLASSIFIER_VAL_SIZE:
        parser.error(
            f"--train-size must be in [1, {DIGITS - CLASSIFIER_VAL_SIZE - 1}], got {args.train_size}"
        )
    config = DemoConfig(
        max_epochs=args.max_epochs,
        seeds=args.seeds,
        seed=args.seed,
        out=args.out,
        accelerator=args.accelerator,
        devices=args.devices,
        width=args.width,
        train_size=args.train_size,
        autoencoder_epochs=args.ae_epochs,
        threads=args.threads,
    )
    started = time.perf_counter()
    result = run_demo(config)
    if not result.runs:  # a non-zero rank of a multi-process run
        return 0
    paths = write_outputs(result)
    print(
        f"\nlightning-dropout demo: digits, seeds {config.seed_list}, {time.perf_counter() - started:.0f} s "
        f"({result.fit_seconds:.0f} s training)\n"
    )
    print("Autoencoders (Figures 7 and 8), held-out digits:\n")
    print(autoencoder_table(result.autoencoders))
    print(f"\nClassifiers, mean ± sd over {config.seeds} seeds (Δ: paired with the no-dropout model):\n")
    print(classifier_table(result.runs))
    print()
    print(units_table(result.runs))
    print("\nWritten:\n" + "\n".join(f"  {path}" for path in paths))
    print(f"\nOpen the dashboard:\n  {tensorboard_command(config.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
