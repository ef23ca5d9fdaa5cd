"""Every callback of lightning-dropout configured from one YAML file with LightningCLI.

    python examples/digits_cli.py fit --config examples/all_callbacks.yaml
    python examples/digits_cli.py fit --config examples/all_callbacks.yaml --trainer.max_epochs 2

Model and data are the demo's (``lightning_dropout.demo``; the YAML picks the CNN);
every callback argument, the schedules included, is a ``class_path`` / ``init_args``
entry in the YAML.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_dropout.demo import DigitsClassifier, DigitsDataModule


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; None reads ``sys.argv``)."""
    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
