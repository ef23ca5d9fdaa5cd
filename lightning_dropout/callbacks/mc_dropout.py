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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_dropout._validation import check_bool, check_choice, check_positive_int
from lightning_dropout.mc import OUTPUT_KINDS, MCOutput, deterministic_reason, mc_mode, mc_samples, summarize
from lightning_dropout.sites import DropoutSite, find_sites

STAGES = ("predict", "test", "validate")


class MCDropout(L.Callback):
    """Keep dropout stochastic in the chosen stages and return Monte-Carlo summaries.

    BatchNorm and every non-dropout module stay in eval mode; Lightning restores all modes
    after each loop as usual. Works for any LightningModule (the
    :class:`~lightning_dropout.DropoutMixin` is not needed) and under DDP, where each rank
    draws its own masks.

    Args:
        n_samples: stochastic passes per batch.
        stages: any of ``"predict"``, ``"test"``, ``"validate"`` (a single name is accepted).
        batched: run the passes on the batch replicated along dim 0 (chunks of
            ``chunk_size`` replicas) rather than one call per pass; every tensor in the batch
            must have the batch along dim 0.
        chunk_size: replicas per batched call; None keeps a call at 1024 rows or fewer.
        output: what a step returns: ``"logits"``, ``"probs"`` or ``"regression"``.
        class_dim: the class dimension of the output.
        return_samples: keep every pass's output in :attr:`MCOutput.samples` (predict).

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: ``n_samples`` or ``chunk_size`` below 1, an unknown stage or ``output``,
            or no stage.

    Example:
        >>> callback = MCDropout(n_samples=20, stages=("predict", "test"))
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
    ) -> None:
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.stages = _check_stages(stages)
        self.batched = check_bool("batched", batched)
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        self.output = check_choice("output", output, OUTPUT_KINDS)
        if isinstance(class_dim, bool) or not isinstance(class_dim, int):
            raise TypeError(f"class_dim must be an int, got {type(class_dim).__name__} {class_dim!r}")
        self.class_dim = class_dim
        self.return_samples = check_bool("return_samples", return_samples)
        self._restore: dict[str, Callable[[], None]] = {}
        self._forward_calls = 0
        self._sites: dict[str, DropoutSite] = {}
        self._warned = False

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "predict" in self.stages:
            self._patch(pl_module, "predict_step", summary=True)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unpatch("predict_step")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.stages:
            self._patch(pl_module, "forward", summary=False)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unpatch_forward("test_step")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "validate" in self.stages:
            self._patch(pl_module, "forward", summary=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unpatch_forward("validation_step")

    def _unpatch_forward(self, step_name: str) -> None:
        if "forward" in self._restore and self._forward_calls == 0:
            # A step that calls submodules directly (self.net(x)) bypasses the MC forward.
            rank_zero_warn(
                f"MCDropout: {step_name} never called the module's forward (self(x)), so its "
                "metrics are not Monte-Carlo estimates"
            )
        self._unpatch("forward")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        for name in list(self._restore):
            self._unpatch(name)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in list(self._restore):
            self._unpatch(name)

    def _mc_step(
        self, pl_module: L.LightningModule, step: Callable[..., Any], summary: bool
    ) -> Callable[..., Any]:
        def mc_step(*args: Any, **kwargs: Any) -> MCOutput | Tensor:
            self._forward_calls += 1
            if args:
                batch, rest = args[0], args[1:]
            elif "batch" in kwargs:
                batch, rest = kwargs.pop("batch"), ()
            else:
                raise TypeError("MCDropout needs the batch as the first argument of the step")

            def one_pass(replicated: Any) -> Any:
                return step(replicated, *rest, **kwargs)

            with mc_mode(pl_module, found=self._sites):
                chunks = mc_samples(one_pass, batch, self.n_samples, pl_module, self.batched, self.chunk_size)
                result = summarize(chunks, self.output, self.class_dim, self.return_samples and summary)
            return result if summary else result.log_mean()

        return mc_step

    def _patch(self, pl_module: L.LightningModule, name: str, summary: bool) -> None:
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
        problem = deterministic_reason(self._sites)
        if problem and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"MCDropout: {type(pl_module).__name__} {problem}, so every Monte-Carlo pass is identical"
            )
        setattr(pl_module, name, self._mc_step(pl_module, getattr(pl_module, name), summary))
        self._restore[name] = restore

    def _unpatch(self, name: str) -> None:
        restore = self._restore.pop(name, None)
        if restore is not None:
            restore()


def _check_stages(stages: Sequence[str] | str) -> tuple[str, ...]:
    names = (stages,) if isinstance(stages, str) else stages
    if not isinstance(names, Sequence):
        raise TypeError(f"stages must be a stage name or a sequence of them, got {type(stages).__name__}")
    checked = tuple(dict.fromkeys(check_choice("stages", s, STAGES) for s in names))
    if not checked:
        raise ValueError(f"stages must name at least one of {list(STAGES)}, got {stages!r}")
    return checked
