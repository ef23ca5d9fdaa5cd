"""MCDropout: Monte-Carlo dropout in Lightning's predict, test and validation loops.

Lightning puts every module in eval mode before these loops (and restores the modes
after), so dropout silently goes deterministic and ``model.train()`` would corrupt
BatchNorm statistics. This callback leaves Lightning's mode switching alone and instead,
in the chosen stages, runs each step ``n_samples`` times with every dropout site
stochastic, attention dropout and rates read in a forward included (Gal & Ghahramani,
ICML 2016):

- predict: ``predict_step`` runs ``n_samples`` times per batch and ``trainer.predict``
  returns one :class:`~lightning_dropout.MCOutput` per batch.
- test, validate: the module's ``forward`` returns the MC prediction (the log predictive
  distribution for logits, the mean for regression), so the metrics computed from
  ``self(x)`` in ``test_step`` / ``validation_step`` come from the MC mean. "validate"
  covers ``trainer.validate`` and the validation loop inside ``fit``.

In test and validate the callback also measures how good the uncertainty is, for the MC
prediction and for the deterministic (eval-mode) forward of the same batch, with
torchmetrics (synced across DDP ranks): ``<stage>/{mc,det}/{accuracy,nll,brier,ece}``
(``<stage>`` is ``test`` or ``val``), a reliability diagram image ``<stage>/mc/reliability``,
histograms of the entropy and BALD, the mean Monte-Carlo standard error, and with
``ood_dataloader_idx`` the out-of-distribution detection scores
``test/mc/ood_{auroc_entropy,auroc_bald,fpr95_entropy}``; regression is measured too
(docs/mc.md lists every tag).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_dropout._validation import check_bool, check_choice, check_positive_int
from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._mc_evaluation import MCEvaluation, reliability_png
from lightning_dropout.callbacks._run import DropoutCallback
from lightning_dropout.consistent_masks import ConsistentMasks
from lightning_dropout.mc import (
    OUTPUT_KINDS,
    STRAY_DRAWS_MESSAGE,
    MCOutput,
    deterministic_reason,
    gaussian_step,
    inconsistent_message,
    mc_samples,
    summarize,
)
from lightning_dropout.selection import check_patterns
from lightning_dropout.sites import DropoutSite, find_sites, select_sites, sites_training

STAGES = ("predict", "test", "validate")
#: The tag prefix of each evaluated stage.
TAG_PREFIX = {"test": "test", "validate": "val"}
#: Where a mapping batch keeps its targets, looked up in this order.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")
CHART_CATEGORY = "MC dropout: uncertainty, MC against deterministic"


class MCDropout(DropoutCallback):
    """Keep dropout stochastic in the chosen stages, return Monte-Carlo summaries, and
    measure how good their uncertainty is.

    BatchNorm and every non-dropout module stay in eval mode; Lightning restores all modes
    after each loop as usual. Works for any LightningModule (the
    :class:`~lightning_dropout.DropoutMixin` is not needed) and under DDP, where each rank
    draws its own masks (or, with ``consistent=True``, every rank uses the same
    sub-networks) and the metrics are synced across ranks.

    In test and validate, for each batch whose step calls ``self(x)``, the callback also
    runs the deterministic forward once and logs, at the end of the loop,
    ``<stage>/{mc,det}/{accuracy,nll,brier,ece}`` for classification (``<stage>``: ``test``
    or ``val``; ECE is torchmetrics' calibration error with ``n_bins`` bins),
    ``<stage>/{mc,det}/{nll,coverage90,mse}`` for ``"gaussian"`` and ``"regression"``, and
    ``<stage>/mc/standard_error`` (the mean Monte-Carlo standard error of the MC mean: is
    ``n_samples`` enough?), with an image ``<stage>/mc/reliability`` and histograms
    ``<stage>/mc/{entropy,bald}`` (``{variance,epistemic}`` for regression) on TensorBoard.
    The targets are read from the batch (``target``).

    Args:
        n_samples: stochastic passes per batch.
        stages: any of ``"predict"``, ``"test"``, ``"validate"`` (a single name is accepted).
        batched: run the passes on the batch replicated along dim 0 (chunks of
            ``chunk_size`` replicas) rather than one call per pass; every tensor in the batch
            must have the batch along dim 0.
        chunk_size: replicas per batched call; None keeps a call at 1024 rows or fewer.
        output: what a step returns: ``"logits"``, ``"probs"``, ``"regression"``, or
            ``"gaussian"`` (a mean and a log-variance: a last dimension of size 2, or a pair).
        class_dim: the class dimension of the output.
        return_samples: keep every pass's output in :attr:`MCOutput.samples` (predict).
        ood_dataloader_idx: the test dataloader holding out-of-distribution inputs: logs
            ``test/mc/ood_auroc_entropy``, ``test/mc/ood_auroc_bald`` and
            ``test/mc/ood_fpr95_entropy`` (``variance`` / ``epistemic`` for regression),
            the other test dataloaders being in distribution, whose inputs alone feed the
            other metrics.
        consistent: pass ``r`` applies one fixed sub-network to every input of the loop
            (see :mod:`lightning_dropout.consistent_masks`).
        sites: only the sites matching these globs drop (see
            :mod:`lightning_dropout.selection`); None for all.
        seed: the consistent masks' seed; None takes the run's seed
            (``torch.initial_seed()``) from rank 0.
        evaluate: measure and log in test and validate (costs one deterministic forward
            per batch).
        target: where the batch keeps its targets: an index or a key; None takes the last
            element of a tuple or list batch, or the first of ``"labels"``, ``"label"``,
            ``"targets"``, ``"target"``, ``"y"`` in a mapping.
        n_bins: calibration bins for the ECE and the reliability diagram.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: ``n_samples``, ``chunk_size`` or ``n_bins`` below 1, an unknown stage or
            ``output``, no stage, a negative ``ood_dataloader_idx`` or one without the test
            stage, or an empty pattern in ``sites``.

    Example:
        >>> callback = MCDropout(n_samples=20, stages=("predict", "test"), ood_dataloader_idx=1)
        >>> callback.stages
        ('predict', 'test')
    """

    def __init__(
        self,
        n_samples: int = 30,
        stages: Sequence[str] | str = ("predict",),
        batched: bool = True,
        chunk_size: int | None = None,
        output: str = "logits",
        class_dim: int = -1,
        return_samples: bool = False,
        ood_dataloader_idx: int | None = None,
        consistent: bool = False,
        sites: str | list[str] | None = None,
        seed: int | None = None,
        evaluate: bool = True,
        target: int | str | None = None,
        n_bins: int = 15,
    ) -> None:
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.stages = _check_stages(stages)
        self.batched = check_bool("batched", batched)
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        self.output = check_choice("output", output, OUTPUT_KINDS)
        self.class_dim = _check_int("class_dim", class_dim)
        self.return_samples = check_bool("return_samples", return_samples)
        if ood_dataloader_idx is not None:
            if _check_int("ood_dataloader_idx", ood_dataloader_idx) < 0:
                raise ValueError(f"ood_dataloader_idx must be >= 0 or None, got {ood_dataloader_idx!r}")
            if "test" not in self.stages:
                raise ValueError(
                    f"ood_dataloader_idx names a test dataloader, but stages {self.stages} has no 'test'"
                )
        self.ood_dataloader_idx = ood_dataloader_idx
        self.consistent = check_bool("consistent", consistent)
        self.sites = check_patterns("sites", sites)
        if seed is not None:
            _check_int("seed", seed)
        self.seed = seed
        self.evaluate = check_bool("evaluate", evaluate)
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, str))):
            raise TypeError(f"target must be an index, a key or None, got {type(target).__name__} {target!r}")
        self.target = target
        self.n_bins = check_positive_int("n_bins", n_bins)
        self._masks_seed = seed
        self._said: set[str] = set()
        self._forget_run()

    def _forget_run(self) -> None:
        super()._forget_run()
        self._restore: dict[str, Callable[[], None]] = {}
        self._forward_calls = 0
        self._sites: dict[str, DropoutSite] = {}
        self._chosen: dict[str, DropoutSite] = {}
        self._evaluation: MCEvaluation | None = None
        self._captured: tuple[MCOutput, Tensor | None] | None = None
        self._pair_output = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.consistent:
            # Every rank must build the same sub-networks: one seed, from rank 0.
            seed = self.seed if self.seed is not None else torch.initial_seed()
            self._masks_seed = int(trainer.strategy.broadcast(seed, src=0))
        evaluated = [TAG_PREFIX[s] for s in self.stages if s in TAG_PREFIX]
        if self.evaluate and evaluated:
            _dashboard.register_charts(trainer, CHART_CATEGORY, self._charts(evaluated), rates=False)

    def _charts(self, prefixes: list[str]) -> _dashboard.Charts:
        names = (
            ("accuracy", "nll", "brier", "ece")
            if self.output in ("logits", "probs")
            else ("nll", "coverage90", "mse")
        )
        charts: _dashboard.Charts = {}
        for prefix in prefixes:
            for name in names:
                charts[f"{prefix}: {name}, MC and deterministic"] = [rf"{prefix}/(mc|det)/{name}$"]
            charts[f"{prefix}: Monte-Carlo standard error"] = [rf"{prefix}/mc/standard_error$"]
        if self.ood_dataloader_idx is not None:
            charts["test: out-of-distribution detection"] = [r"test/mc/ood_"]
        return charts

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "predict" in self.stages:
            self._patch(trainer, pl_module, "predict_step", summary=True)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unpatch("predict_step")

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_loop(trainer, pl_module, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        ood = None if self.ood_dataloader_idx is None else dataloader_idx == self.ood_dataloader_idx
        self._measure(batch, ood)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_results(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unpatch_forward("test_step")

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_loop(trainer, pl_module, "validate")

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._measure(batch, None)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_results(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unpatch_forward("validation_step")

    def _start_loop(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._evaluation = None
        if stage not in self.stages:
            return
        self._patch(trainer, pl_module, "forward", summary=False)
        if self.evaluate and not trainer.sanity_checking:
            self._evaluation = MCEvaluation(self.output, self.class_dim, self.n_bins)
            _dashboard.write_layout(trainer)

    def _unpatch_forward(self, step_name: str) -> None:
        if "forward" in self._restore and self._forward_calls == 0:
            # A step that calls submodules directly (self.net(x)) bypasses the MC forward.
            rank_zero_warn(
                f"MCDropout: {step_name} never called the module's forward (self(x)), so its "
                "metrics are not Monte-Carlo estimates"
            )
        self._unpatch("forward")
        self._evaluation = None

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        for name in list(self._restore):
            self._unpatch(name)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in list(self._restore):
            self._unpatch(name)

    # -- the Monte-Carlo step ---------------------------------------------------------------

    def _mc_step(
        self, pl_module: L.LightningModule, step: Callable[..., Any], summary: bool
    ) -> Callable[..., Any]:
        def mc_step(*args: Any, **kwargs: Any) -> Any:
            self._forward_calls += 1
            if args:
                batch, rest = args[0], args[1:]
            elif "batch" in kwargs:
                batch, rest = kwargs.pop("batch"), ()
            else:
                raise TypeError("MCDropout needs the batch as the first argument of the step")

            def one_pass(replicated: Any) -> Any:
                out = step(replicated, *rest, **kwargs)
                if self.output == "gaussian":
                    self._pair_output = isinstance(out, (tuple, list))
                return out

            one: Callable[[Any], Any] = gaussian_step(one_pass) if self.output == "gaussian" else one_pass
            # The deterministic forward first, in the modes Lightning set (eval).
            det = one(batch) if self._evaluation is not None and not summary else None
            with sites_training(pl_module, self._chosen):
                masks = (
                    ConsistentMasks(pl_module, self._chosen, self._masks_seed)
                    if self.consistent and self._masks_seed is not None
                    else None
                )
                with masks if masks is not None else nullcontext():
                    if masks is not None and masks.inconsistent:
                        self._warn_once(
                            "inconsistent", f"MCDropout: {inconsistent_message(masks.inconsistent)}"
                        )
                    chunks = mc_samples(
                        one, batch, self.n_samples, pl_module, self.batched, self.chunk_size, masks
                    )
                    result = summarize(chunks, self.output, self.class_dim, self.return_samples and summary)
            if masks is not None and masks.stray_draws:
                self._warn_once("stray", f"MCDropout: {STRAY_DRAWS_MESSAGE}")
            if summary:
                return result
            self._captured = (result, det)
            prediction = result.log_mean()
            if self.output == "gaussian" and self._pair_output:
                return prediction[..., 0], prediction[..., 1]
            return prediction

        return mc_step

    def _patch(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, summary: bool) -> None:
        # An instance attribute shadows the class's method; strategies look the step up
        # on the instance, so DDP's wrapper calls the replacement too.
        self._unpatch(name)
        had_own = name in vars(pl_module)
        previous = vars(pl_module).get(name)

        def restore() -> None:
            if had_own:
                setattr(pl_module, name, previous)
            else:
                vars(pl_module).pop(name, None)

        self._forward_calls = 0
        # Found once per loop (layers built in configure_model exist by now).
        self._sites = find_sites(pl_module)
        self._chosen = select_sites(pl_module, self.sites, self._sites)
        problem = deterministic_reason(self._chosen)
        if problem:
            self._warn_once(
                "deterministic",
                f"MCDropout: {type(pl_module).__name__} {problem}, so every Monte-Carlo pass is identical",
            )
        setattr(pl_module, name, self._mc_step(pl_module, getattr(pl_module, name), summary))
        self._restore[name] = restore

    def _unpatch(self, name: str) -> None:
        restore = self._restore.pop(name, None)
        if restore is not None:
            restore()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            rank_zero_warn(message)

    # -- measuring --------------------------------------------------------------------------

    def _measure(self, batch: Any, ood: bool | None) -> None:
        captured, self._captured = self._captured, None
        evaluation = self._evaluation
        if evaluation is None or captured is None:
            return
        mc, det = captured
        target = None
        if not ood:
            found, problem = self._target_of(batch)
            if problem is None:
                target, problem = evaluation.targets(mc, found)
            if problem is not None:
                self._warn_once("target", f"MCDropout: no metrics from the targets: {problem}")
        evaluation.update(mc, det, target, ood)

    def _target_of(self, batch: Any) -> tuple[Any, str | None]:
        if self.target is not None:
            try:
                return batch[self.target], None
            except (KeyError, IndexError, TypeError):
                return None, f"the batch (a {type(batch).__name__}) has no target at {self.target!r}"
        if isinstance(batch, Mapping):
            key = next((k for k in TARGET_KEYS if k in batch), None)
            if key is None:
                return None, f"the batch has none of the keys {list(TARGET_KEYS)}; pass target=<key>"
            return batch[key], None
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[-1], None
        return (
            None,
            f"a {type(batch).__name__} batch holds no (input, target) pair; pass target=<index or key>",
        )

    def _log_results(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        evaluation = self._evaluation
        if evaluation is None:
            return
        results = evaluation.compute()  # every rank: the metrics sync here
        prefix = TAG_PREFIX[stage]
        if stage == "test" and self.ood_dataloader_idx is not None:
            names = evaluation.score_names
            if f"mc/ood_auroc_{names[0]}" not in results.scalars:
                self._warn_once(
                    "ood",
                    f"MCDropout: no OOD scores: test dataloader {self.ood_dataloader_idx} "
                    "(ood_dataloader_idx) and at least one other test dataloader must give batches",
                )
        for name, value in results.scalars.items():
            pl_module.log(f"{prefix}/{name}", value)
        step = trainer.global_step
        if results.diagrams:
            errors = {
                which: results.scalars[f"{which}/ece"]
                for which in results.diagrams
                if f"{which}/ece" in results.scalars
            }
            png, height, width = reliability_png(results.diagrams, errors)
            _dashboard.log_png(trainer, f"{prefix}/mc/reliability", png, height, width, step)
        for name, values in results.histograms.items():
            if values.numel():
                _dashboard.log_histogram(trainer, f"{prefix}/{name}", values, step)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_stages(stages: Sequence[str] | str) -> tuple[str, ...]:
    names = (stages,) if isinstance(stages, str) else stages
    if not isinstance(names, Sequence):
        raise TypeError(f"stages must be a stage name or a sequence of them, got {type(stages).__name__}")
    checked = tuple(dict.fromkeys(check_choice("stages", s, STAGES) for s in names))
    if not checked:
        raise ValueError(f"stages must name at least one of {list(STAGES)}, got {stages!r}")
    return checked
