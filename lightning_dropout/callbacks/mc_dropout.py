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

With ``calibration`` the callback fits a temperature (for the MC prediction and, as a
baseline, for the deterministic forward) and a split-conformal threshold on the validation
loop, keeps them in its state (checkpointed; every DDP rank fits on the gathered
validation outputs, so all agree) and applies them in test and predict:
``<stage>/mc_ts/{nll,ece,brier}``, ``<stage>/det_ts/{nll,ece,brier}``,
``<stage>/mc/{coverage,set_size}``, and ``MCOutput.temperature`` / ``MCOutput.sets``.
With ``n_samples="auto"`` each batch gets the passes its Monte-Carlo standard error needs,
logged as ``<stage>/mc/n_samples``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_dropout._validation import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_positive_int,
    check_probability,
    check_seed,
)
from lightning_dropout.calibration import METHODS, conformal_threshold, fit_temperature, prediction_sets
from lightning_dropout.callbacks import _dashboard
from lightning_dropout.callbacks._mc_evaluation import (
    MCEvaluation,
    class_rows,
    reliability_png,
    shaped_targets,
)
from lightning_dropout.callbacks._run import DropoutCallback
from lightning_dropout.mc import (
    AUTO,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_TOLERANCE,
    OUTPUT_KINDS,
    MCOutput,
    MCPasses,
    check_n_samples,
    gaussian_step,
)
from lightning_dropout.selection import check_patterns
from lightning_dropout.sites import find_sites, select_sites

STAGES = ("predict", "test", "validate")
#: The tag prefix of each evaluated stage.
TAG_PREFIX = {"test": "test", "validate": "val"}
#: Where a mapping batch keeps its targets, looked up in this order.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")
CHART_CATEGORY = "MC dropout: uncertainty, MC against deterministic"
CALIBRATIONS = ("temperature", "conformal")


class MCDropout(DropoutCallback):
    """Keep dropout stochastic in the chosen stages, return Monte-Carlo summaries, measure
    how good their uncertainty is, and fix their calibration.

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

    Calibration (classification): at the end of each validation loop (not the sanity
    check) the callback fits, on the MC logits of every validation batch gathered from
    every rank, ``"temperature"``: one temperature for the MC passes
    (:func:`~lightning_dropout.calibration.fit_temperature` on ``[S, N, C]``) and one for the
    deterministic forward; ``"conformal"``: the split-conformal threshold of the (tempered)
    MC mean at level ``alpha``. In test it logs ``test/mc_ts/{nll,ece,brier}``,
    ``test/det_ts/{nll,ece,brier}`` and ``test/mc/{coverage,set_size}``; in predict the
    :class:`~lightning_dropout.MCOutput` is tempered and carries ``sets`` (a boolean mask,
    the class dimension last). What was fitted is logged as ``val/mc_ts/temperature``,
    ``val/det_ts/temperature`` and ``val/mc/conformal_threshold`` and kept in the
    callback's ``state_dict``.

    Args:
        n_samples: stochastic passes per batch, or ``"auto"``: passes until the
            Monte-Carlo standard error of the mean probability (mean output for regression)
            is at most ``tolerance`` for every input of the batch (``max_samples`` at most);
            the mean number of passes is logged as ``<stage>/mc/n_samples``.
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
        seed: the consistent masks' seed (None takes the run's seed, ``torch.initial_seed()``,
            from rank 0) and the conformal randomisation's seed at fitting (None: 0).
        evaluate: measure and log in test and validate (costs one deterministic forward
            per batch).
        target: where the batch keeps its targets: an index or a key; None takes the last
            element of a tuple or list batch, or the first of ``"labels"``, ``"label"``,
            ``"targets"``, ``"target"``, ``"y"`` in a mapping.
        n_bins: calibration bins for the ECE and the reliability diagram.
        tolerance: the standard error ``n_samples="auto"`` stops at.
        max_samples: the most passes ``n_samples="auto"`` draws per batch.
        calibration: ``"temperature"``, ``"conformal"``, both (a sequence) or None.
            Needs ``"validate"`` in ``stages`` and a classification ``output``.
        alpha: the conformal sets' allowed miscoverage: they hold the true class with
            probability at least ``1 - alpha`` on data exchangeable with the validation set.
        conformal_method: ``"aps"``, ``"raps"`` or ``"lac"``
            (see :mod:`lightning_dropout.calibration`).
        calibration_dataloader_idx: the validation dataloader calibration fits on; None
            for all of them.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: ``n_samples``, ``chunk_size`` or ``n_bins`` below 1, an unknown stage,
            ``output``, calibration or method, no stage, a negative ``ood_dataloader_idx``
            or one without the test stage, an empty pattern in ``sites``, ``alpha`` outside
            (0, 1), or calibration without the validate stage or for regression.

    Example:
        >>> callback = MCDropout(n_samples=20, stages=("predict", "test"), ood_dataloader_idx=1)
        >>> callback.stages
        ('predict', 'test')
        >>> MCDropout(stages=("validate", "test"), calibration=("temperature", "conformal")).calibration
        ('temperature', 'conformal')
    """

    def __init__(
        self,
        n_samples: int | str = 30,
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
        tolerance: float = DEFAULT_TOLERANCE,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        calibration: Sequence[str] | str | None = None,
        alpha: float = 0.1,
        conformal_method: str = "aps",
        calibration_dataloader_idx: int | None = None,
    ) -> None:
        self.n_samples = check_n_samples(n_samples)
        self.stages = _check_stages(stages)
        self.batched = check_bool("batched", batched)
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        self.output = check_choice("output", output, OUTPUT_KINDS)
        self.class_dim = check_int("class_dim", class_dim)
        self.return_samples = check_bool("return_samples", return_samples)
        if ood_dataloader_idx is not None:
            check_int("ood_dataloader_idx", ood_dataloader_idx, minimum=0)
            if "test" not in self.stages:
                raise ValueError(
                    f"ood_dataloader_idx names a test dataloader, but stages {self.stages} has no 'test'"
                )
        self.ood_dataloader_idx = ood_dataloader_idx
        self.consistent = check_bool("consistent", consistent)
        self.sites = check_patterns("sites", sites)
        self.seed = check_seed("seed", seed)
        self.evaluate = check_bool("evaluate", evaluate)
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, str))):
            raise TypeError(f"target must be an index, a key or None, got {type(target).__name__} {target!r}")
        self.target = target
        self.n_bins = check_positive_int("n_bins", n_bins)
        # MCPasses checks these again; checking here names a bad value at construction.
        self.tolerance = check_positive("tolerance", tolerance)
        self.max_samples = check_int("max_samples", max_samples, minimum=2)
        self.calibration = _check_calibration(calibration)
        if self.calibration:
            if self.output not in ("logits", "probs"):
                raise ValueError(f"calibration needs a classification output, got output={self.output!r}")
            if "validate" not in self.stages:
                raise ValueError(
                    f"calibration fits in the validation loop, but stages {self.stages} has no 'validate'"
                )
        self.alpha = check_probability("alpha", alpha)
        if self.alpha in (0.0, 1.0):
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.conformal_method = check_choice("conformal_method", conformal_method, METHODS)
        if calibration_dataloader_idx is not None:
            check_int("calibration_dataloader_idx", calibration_dataloader_idx, minimum=0)
        self.calibration_dataloader_idx = calibration_dataloader_idx
        self._masks_seed = seed
        self._said: set[str] = set()
        # Checkpoint state: what calibration fitted (kept in copies).
        self._fitted: dict[str, float] = {}
        self._forget_run()

    def _forget_run(self) -> None:
        super()._forget_run()
        self._restore: dict[str, Callable[[], None]] = {}
        self._forward_calls = 0
        self._passes: MCPasses | None = None
        self._evaluation: MCEvaluation | None = None
        self._captured: _Captured | None = None
        self._collected: _Collected | None = None
        self._pair_output = False

    # -- state ------------------------------------------------------------------------------

    @property
    def temperature(self) -> float | None:
        """The fitted temperature of the MC passes, or None."""
        return self._fitted.get("temperature")

    @property
    def threshold(self) -> float | None:
        """The fitted conformal threshold, or None."""
        return self._fitted.get("threshold")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fitted": dict(self._fitted), "alpha": self.alpha, "conformal_method": self.conformal_method}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fitted = {str(k): float(v) for k, v in state_dict.get("fitted", {}).items()}
        fitted_with = (state_dict.get("alpha"), state_dict.get("conformal_method"))
        same = fitted_with == (self.alpha, self.conformal_method)
        if "threshold" in fitted and not same:
            # A threshold holds only for the level and score it was fitted with.
            fitted.pop("threshold")
            rank_zero_warn(
                f"MCDropout: the checkpoint's conformal threshold was fitted with alpha="
                f"{state_dict.get('alpha')!r}, method={state_dict.get('conformal_method')!r}; this "
                f"callback has alpha={self.alpha!r}, method={self.conformal_method!r}: it is dropped"
            )
        self._fitted = fitted

    # -- the loops --------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.consistent:
            # Every rank must build the same sub-networks: one seed, from rank 0.
            seed = self.seed if self.seed is not None else torch.initial_seed()
            self._masks_seed = int(trainer.strategy.broadcast(seed, src=0))
        evaluated = [TAG_PREFIX[s] for s in self.stages if s in TAG_PREFIX]
        if self.evaluate and evaluated:
            _dashboard.register_charts(trainer, CHART_CATEGORY, self._charts(evaluated), rates=False)

    def _charts(self, prefixes: list[str]) -> _dashboard.Charts:
        classification = self.output in ("logits", "probs")
        names = ("accuracy", "nll", "brier", "ece") if classification else ("nll", "coverage90", "mse")
        charts: _dashboard.Charts = {}
        for prefix in prefixes:
            for name in names:
                which = "mc|det|mc_ts|det_ts" if self.calibration and name != "accuracy" else "mc|det"
                charts[f"{prefix}: {name}, MC and deterministic"] = [rf"{prefix}/({which})/{name}$"]
            charts[f"{prefix}: Monte-Carlo standard error"] = [rf"{prefix}/mc/standard_error$"]
            if self.n_samples == AUTO:
                charts[f"{prefix}: Monte-Carlo passes"] = [rf"{prefix}/mc/n_samples$"]
            if "conformal" in self.calibration:
                charts[f"{prefix}: conformal sets"] = [rf"{prefix}/mc/(coverage|set_size)$"]
        if self.ood_dataloader_idx is not None:
            charts["test: out-of-distribution detection"] = [r"test/mc/ood_"]
        return charts

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.stages:
            self._patch(pl_module, "predict_step", "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unpatch("predict_step")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_loop(trainer, pl_module, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(batch, "test", dataloader_idx)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_loop("test_step")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_loop(trainer, pl_module, "validate")

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(batch, "validate", dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_loop("validation_step")

    def _start_loop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluation = None
        self._collected = None
        if stage not in self.stages:
            return
        self._patch(pl_module, "forward", stage)
        if trainer.sanity_checking:
            return
        if self.evaluate:
            self._evaluation = MCEvaluation(self.output, self.class_dim, self.n_bins, self.n_samples == AUTO)
            _dashboard.write_layout(trainer)
        if stage == "validate" and self.calibration:
            self._collected = _Collected()

    def _end_loop(self, step_name: str) -> None:
        if "forward" in self._restore and self._forward_calls == 0:
            # A step that calls submodules directly (self.net(x)) bypasses the MC forward.
            rank_zero_warn(
                f"MCDropout: {step_name} never called the module's forward (self(x)), so its "
                "metrics are not Monte-Carlo estimates"
            )
        self._unpatch("forward")
        self._evaluation = None
        self._collected = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        for name in list(self._restore):
            self._unpatch(name)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in list(self._restore):
            self._unpatch(name)

    # -- the Monte-Carlo step ---------------------------------------------------------------

    def _mc_step(self, step: Callable[..., Any], stage: str) -> Callable[..., Any]:
        predict = stage == "predict"

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

            passes = self._passes
            assert passes is not None, "the step is patched only together with its passes"
            collecting = self._collected is not None
            det = None
            if not predict and (self._evaluation is not None or collecting):
                # The deterministic forward first, in the modes Lightning set (eval).
                det = (gaussian_step(one_pass) if self.output == "gaussian" else one_pass)(batch)
            temperature = self.temperature if stage != "validate" else None
            self._say_unfitted(stage)
            temperatures = [temperature] if predict else [None] + ([temperature] if temperature else [])
            result = passes.run(
                batch,
                one_pass,
                temperatures=temperatures,
                return_samples=self.return_samples and predict,
                keep_raw=collecting,
            )
            applied = result.outputs[-1]
            if stage != "validate" and self.threshold is not None:
                applied.sets = self._sets(applied.mean)
            if predict:
                return applied
            self._captured = _Captured(
                result.outputs[0], det, result.raw, applied if temperature else None, applied.sets
            )
            prediction = result.outputs[0].log_mean()
            if self.output == "gaussian" and self._pair_output:
                return prediction[..., 0], prediction[..., 1]
            return prediction

        return mc_step

    def _sets(self, mean: Tensor) -> Tensor:
        rows = mean.movedim(self.class_dim, -1)
        threshold = self.threshold
        assert threshold is not None
        sets = prediction_sets(rows.reshape(-1, rows.shape[-1]).float(), threshold, self.conformal_method)
        return sets.reshape(rows.shape)

    def _say_unfitted(self, stage: str) -> None:
        if stage == "validate" or not self.calibration:
            return
        missing = [
            name
            for name, key in (("temperature", "temperature"), ("conformal", "threshold"))
            if name in self.calibration and key not in self._fitted
        ]
        if missing:
            self._warn_once(
                "unfitted",
                f"MCDropout: calibration {missing} not fitted yet (it fits at the end of a validation "
                "loop, or loads from a checkpoint): the outputs are not calibrated",
            )

    def _patch(self, pl_module: pl.LightningModule, name: str, stage: str) -> None:
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
            self._passes = None

        self._forward_calls = 0
        # Found once per loop (layers built in configure_model exist by now).
        chosen = select_sites(pl_module, self.sites, find_sites(pl_module))
        self._passes = MCPasses(
            pl_module,
            chosen,
            n_samples=self.n_samples,
            tolerance=self.tolerance,
            max_samples=self.max_samples,
            batched=self.batched,
            chunk_size=self.chunk_size,
            output=self.output,
            class_dim=self.class_dim,
            consistent_seed=self._masks_seed if self.consistent else None,
            warn=lambda key, message: self._warn_once(key, f"MCDropout: {message}"),
        )
        setattr(pl_module, name, self._mc_step(getattr(pl_module, name), stage))
        self._restore[name] = restore

    def _unpatch(self, name: str) -> None:
        restore = self._restore.pop(name, None)
        if restore is not None:
            restore()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            rank_zero_warn(message)

    # -- measuring and fitting --------------------------------------------------------------

    def _batch_end(self, batch: Any, stage: str, dataloader_idx: int) -> None:
        captured, self._captured = self._captured, None
        if captured is None:
            return
        ood = None
        if stage == "test" and self.ood_dataloader_idx is not None:
            ood = dataloader_idx == self.ood_dataloader_idx
        collect = self._collected is not None and self.calibration_dataloader_idx in (None, dataloader_idx)
        evaluation = self._evaluation
        if evaluation is None and not collect:
            return
        target = None
        if not ood:
            found, problem = self._target_of(batch)
            if problem is None:
                target, problem = shaped_targets(self.output, self.class_dim, captured.mc, found)
            if problem is not None:
                self._warn_once("target", f"MCDropout: no metrics from the targets: {problem}")
        if evaluation is not None:
            evaluation.update(
                captured.mc,
                captured.det,
                target,
                ood,
                calibrated=captured.calibrated,
                det_temperature=self._fitted.get("det_temperature") if captured.calibrated else None,
                sets=captured.sets,
            )
        if collect and target is not None and self._collected is not None:
            self._collected.add(captured, target, self.output, self.class_dim)

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

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._collected is not None:
            self._fit(trainer, pl_module, self._collected)
            self._collected = None
        self._log_results(trainer, pl_module, stage)

    def _fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, collected: _Collected) -> None:
        # Every rank gathers every rank's outputs and fits on the union, so all agree; the
        # broadcast from rank 0 makes that exact whatever floating-point order did.
        mc, det, targets = collected.gathered(trainer.strategy, trainer.world_size, pl_module.device)
        fitted: dict[str, float] = {}
        if targets.numel():
            if "temperature" in self.calibration:
                fitted["temperature"] = fit_temperature(mc, targets)
                fitted["det_temperature"] = fit_temperature(det, targets)
            if "conformal" in self.calibration:
                probs = (mc / fitted.get("temperature", 1.0)).softmax(-1).mean(0)
                generator = torch.Generator().manual_seed(self.seed if self.seed is not None else 0)
                threshold = conformal_threshold(probs, targets, self.alpha, self.conformal_method, generator)
                fitted["threshold"] = threshold
        fitted = trainer.strategy.broadcast(fitted, src=0)
        if not fitted:
            self._warn_once("uncalibrated", "MCDropout: no validation batch with targets to calibrate on")
            return
        self._fitted = fitted
        names = {"temperature": "val/mc_ts/temperature", "det_temperature": "val/det_ts/temperature"}
        names["threshold"] = "val/mc/conformal_threshold"
        for key, value in fitted.items():
            if value != float("inf"):
                pl_module.log(names[key], value)

    def _log_results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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


@dataclass
class _Captured:
    """What one MC step leaves for the batch's end: the summary, the deterministic output,
    the raw passes (when calibration collects them), the tempered summary and the conformal
    sets (when fitted)."""

    mc: MCOutput
    det: Tensor | None
    raw: Tensor | None
    calibrated: MCOutput | None
    sets: Tensor | None


@dataclass
class _Collected:
    """One validation loop's logits and targets, on the CPU, for calibration."""

    mc: list[Tensor] = field(default_factory=list)
    det: list[Tensor] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)

    def add(self, captured: _Captured, target: Tensor, output: str, class_dim: int) -> None:
        assert captured.raw is not None and captured.det is not None
        mc = captured.raw.movedim(class_dim if class_dim < 0 else class_dim + 1, -1)
        mc = mc.reshape(mc.shape[0], -1, mc.shape[-1])
        det = class_rows(captured.det, class_dim)
        if output == "probs":
            mc, det = (t.clamp_min(torch.finfo(t.dtype).tiny).log() for t in (mc, det))
        self.mc.append(mc.detach().float().cpu())
        self.det.append(det.detach().float().cpu())
        self.targets.append(target.detach().long().cpu())

    def gathered(self, strategy: Any, world_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Every rank's rows, concatenated in rank order (``n_samples="auto"`` draws a different
        number of passes per batch: the first ``S`` passes of each, ``S`` the fewest)."""
        passes = min((t.shape[0] for t in self.mc), default=0)
        rows = sum(t.shape[0] for t in self.targets)
        classes = self.mc[0].shape[-1] if self.mc else 0
        mc = torch.cat([t[:passes] for t in self.mc], 1) if self.mc else torch.zeros(0, 0, 0)
        det = torch.cat(self.det) if self.det else torch.zeros(0, 0)
        targets = torch.cat(self.targets) if self.targets else torch.zeros(0, dtype=torch.long)
        if world_size == 1:
            return mc, det, targets
        shape = torch.tensor([passes if rows else 2**62, rows, classes], device=device)
        shapes = strategy.all_gather(shape).reshape(-1, 3).tolist()
        passes = min(s for s, _, _ in shapes)
        most = max(r for _, r, _ in shapes)
        classes = max(c for _, _, c in shapes)
        if most == 0:
            return torch.zeros(0, 0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)

        def padded(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
            out = torch.zeros(shape, dtype=tensor.dtype, device=device)
            index = tuple(slice(0, n) for n in tensor.shape)
            out[index] = tensor.to(device)
            return out

        mc = mc[:passes] if rows else torch.zeros(passes, 0, classes)
        det = det if rows else torch.zeros(0, classes)
        parts = [
            strategy.all_gather(padded(mc, (passes, most, classes))),
            strategy.all_gather(padded(det, (most, classes))),
            strategy.all_gather(padded(targets, (most,))),
        ]
        counts = [r for _, r, _ in shapes]
        mc = torch.cat([parts[0][i, :, :n] for i, n in enumerate(counts)], 1).cpu()
        det = torch.cat([parts[1][i, :n] for i, n in enumerate(counts)]).cpu()
        targets = torch.cat([parts[2][i, :n] for i, n in enumerate(counts)]).cpu()
        return mc, det, targets


def _check_calibration(calibration: Sequence[str] | str | None) -> tuple[str, ...]:
    if calibration is None:
        return ()
    names = (calibration,) if isinstance(calibration, str) else calibration
    if not isinstance(names, Sequence):
        raise TypeError(
            f"calibration must be a name, a sequence of them or None, got {type(calibration).__name__}"
        )
    return tuple(dict.fromkeys(check_choice("calibration", c, CALIBRATIONS) for c in names))


def _check_stages(stages: Sequence[str] | str) -> tuple[str, ...]:
    names = (stages,) if isinstance(stages, str) else stages
    if not isinstance(names, Sequence):
        raise TypeError(f"stages must be a stage name or a sequence of them, got {type(stages).__name__}")
    checked = tuple(dict.fromkeys(check_choice("stages", s, STAGES) for s in names))
    if not checked:
        raise ValueError(f"stages must name at least one of {list(STAGES)}, got {stages!r}")
    return checked
