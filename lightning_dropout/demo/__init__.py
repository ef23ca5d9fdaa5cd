"""The demo: dropout's effects, reproduced offline on scikit-learn's handwritten digits.

The 1797 8x8 digits are real data bundled with scikit-learn (no download). The demo
trains:

- two autoencoders 64-256-64, without and with dropout (p = 0.5) on the hidden units:
  their features (Srivastava et al., JMLR 2014, Figure 7) and the histograms of their
  mean activations and activations (Figure 8);
- over several seeds, each with its own split: an over-sized MLP without dropout and with
  scheduled dropout, and a small CNN without dropout, with element dropout and with
  SpatialDropout (Tompson et al., CVPR 2015) at the same p, reporting mean ± sd of test
  error, test NLL and the train-test NLL gap, and the co-adaptation, sparsity and mean
  activation of every hidden layer.

Every run logs to TensorBoard with the package's monitors; ``report.md`` and the PNGs go
to the output folder. ``lightning-dropout demo`` (``lightning_dropout.cli``) runs it.
"""

from lightning_dropout.demo.autoencoder import AutoencoderResult, DigitsAutoencoder, FigureLogger
from lightning_dropout.demo.data import DigitsDataModule, load_digits_tensors
from lightning_dropout.demo.experiments import DemoConfig
from lightning_dropout.demo.measure import LayerStats, RunResult, measure_classifier
from lightning_dropout.demo.models import DigitsClassifier, DigitsCNN, DigitsMLP
from lightning_dropout.demo.report import (
    autoencoder_table,
    classifier_table,
    tensorboard_command,
    units_table,
    write_outputs,
)
from lightning_dropout.demo.run import DemoResult, run_demo

__all__ = [
    "AutoencoderResult",
    "DemoConfig",
    "DemoResult",
    "DigitsAutoencoder",
    "DigitsCNN",
    "DigitsClassifier",
    "DigitsDataModule",
    "DigitsMLP",
    "FigureLogger",
    "LayerStats",
    "RunResult",
    "autoencoder_table",
    "classifier_table",
    "load_digits_tensors",
    "measure_classifier",
    "run_demo",
    "tensorboard_command",
    "units_table",
    "write_outputs",
]
