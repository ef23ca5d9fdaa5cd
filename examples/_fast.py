"""The examples' shared command line: ``--fast`` (or LIGHTNING_DROPOUT_FAST=1) for a quick run."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def parse(description: str | None, argv: Sequence[str] | None, epochs: int) -> argparse.Namespace:
    """Parse ``--fast``, ``--epochs``, ``--seed`` and ``--out``; fast mode means 2 epochs."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="a few seconds' run (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {epochs})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/examples", help="TensorBoard log directory")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("LIGHTNING_DROPOUT_FAST") == "1"
    args.epochs = args.epochs or (2 if args.fast else epochs)
    return args
