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
        help="train three models on scikit-learn's digits with every monitor on, then report",
        description="Train an MLP without dropout, the same MLP with scheduled dropout and a CNN "
        "with SpatialDropout on scikit-learn's bundled handwritten digits (no download), log "
        "everything to TensorBoard and print what dropout changed.",
    )
    demo.add_argument("--max-epochs", type=int, default=40, help="epochs per model (default 40)")
    demo.add_argument("--out", default="runs", help="TensorBoard log directory (default ./runs)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, init and masks")
    demo.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    demo.add_argument("--devices", type=_devices, default=1, help="devices per model (default 1)")
    demo.add_argument("--width", type=int, default=1024, help="hidden units of the MLPs (default 1024)")
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the console script with ``argv`` (default: the process arguments).

    Raises:
        SystemExit: on bad arguments (argparse prints the error).
    """
    args = build_parser().parse_args(argv)
    if args.max_epochs < 1:
        build_parser().error(f"--max-epochs must be >= 1, got {args.max_epochs}")
    # Imported here so `lightning-dropout --help` answers at once.
    from lightning_dropout.demo import DemoConfig, format_table, run_demo, tensorboard_command

    config = DemoConfig(
        max_epochs=args.max_epochs,
        out=args.out,
        seed=args.seed,
        accelerator=args.accelerator,
        devices=args.devices,
        width=args.width,
        progress_bar=not args.no_progress_bar,
    )
    started = time.perf_counter()
    reports = run_demo(config)
    if reports:
        print(
            f"\nlightning-dropout demo: digits, seed {args.seed}, {args.max_epochs} epochs per model, "
            f"{time.perf_counter() - started:.0f} s\n"
        )
        print(format_table(reports))
        print(f"\nOpen the dashboard:\n  {tensorboard_command(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
