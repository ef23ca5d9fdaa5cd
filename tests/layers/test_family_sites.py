"""DropPath, DropBlock2d, LockedDropout, EmbeddingDropout and ConcreteDropout as dropout
sites: found with their kinds, scheduled (drop-path depth profile kept, a learned p
refused), sampled by Monte-Carlo inference, monitored (p and realised rate) in a fit."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_dropout import ConcreteDropout, DropBlock2d, DropPath, EmbeddingDropout, LockedDropout
from lightning_dropout.callbacks import DropoutScheduler, DropRateMonitor
from lightning_dropout.layers import drop_path_rates
from lightning_dropout.mc import mc_predict
from lightning_dropout.schedules import Constant, Linear
from lightning_dropout.sites import find_sites
from tests._loggers import MemoryLogger

SIGMAS = 5.0
VOCABULARY, STEPS, FEATURES, BATCH = 300, 16, 16, 32


class Block(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, FEATURES)
        self.drop_path = DropPath(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(torch.tanh(self.fc(x)))


class Family(pl.LightningModule):
    """Tokens -> embedding dropout -> locked dropout -> two drop-path blocks -> the sequence
    read as a one-channel image -> DropBlock -> Concrete dropout -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = EmbeddingDropout(nn.Embedding(VOCABULARY, FEATURES), 0.2)
        self.locked = LockedDropout(0.3)
        self.blocks = nn.ModuleList([Block(p) for p in drop_path_rates(0.2, 2)])
        self.block_drop = DropBlock2d(0.25, block_size=3)
        self.concrete = ConcreteDropout(0.3)
        self.head = nn.Linear(STEPS * FEATURES, 4)
        self.seen: list[dict[str, float | None]] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.locked(self.embed(tokens))
        for block in self.blocks:
            h = block(h)
        h = self.block_drop(h.unsqueeze(1)).flatten(1)
        return self.head(self.concrete(h))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append({name: site.p for name, site in find_sites(self).items()})
        return self(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # A large rate on the learned p so that it visibly moves in a few steps.
        return torch.optim.SGD([{"params": [self.concrete.p_logit], "lr": 2.0}, *self._others()], lr=0.01)

    def _others(self) -> list[dict[str, list[nn.Parameter]]]:
        return [{"params": [p for n, p in self.named_parameters() if n != "concrete.p_logit"]}]


def batches(count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCABULARY, (BATCH, STEPS), generator=generator) for _ in range(count)]


KINDS = {
    "embed": "dropout",
    "locked": "dropout",
    "blocks.0.drop_path": "drop_path",
    "blocks.1.drop_path": "drop_path",
    "block_drop": "drop_block",
    "concrete": "dropout",
}


def test_every_layer_is_a_site_of_its_kind() -> None:
    sites = find_sites(Family())
    assert {name: site.kind for name, site in sites.items()} == KINDS
    assert all(site.is_module and site.settable and site.gates == (site.module,) for site in sites.values())


def test_the_scheduler_refuses_a_learned_p() -> None:
    with pytest.raises(ValueError, match=r"cannot schedule a learned p \(ConcreteDropout\): \['concrete'\]"):
        DropoutScheduler(Constant(0.1)).find_groups(Family())
    with pytest.raises(ValueError, match="learned p"):
        DropoutScheduler({"*": Constant(0.1), "embed": Constant(0.2)}).find_groups(Family())
    groups = DropoutScheduler({"blocks": Constant(0.1), "embed": Constant(0.2)}).find_groups(Family())
    assert {g: [s.name for s in sites] for g, sites in groups.items()} == {
        "blocks": ["blocks.0.drop_path", "blocks.1.drop_path"],
        "embed": ["embed"],
    }


def binomial_bound(p: float, units: float) -> float:
    return SIGMAS * math.sqrt(p * (1 - p) / units)


def test_scheduled_sampled_and_monitored_in_a_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Family()
    ramp = Linear(0.0, 0.4, steps=3)
    scheduler = DropoutScheduler(
        {"blocks": ramp, "block_drop": Constant(0.25), "locked": Constant(0.3), "embed": Constant(0.2)}
    )
    logger = MemoryLogger()
    data = batches()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=len(data),
        logger=logger,
        callbacks=[scheduler, DropRateMonitor(every_n_steps=1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=None))
    # Scheduled: the drop-path profile (0.1, 0.2 built) follows the ramp in proportion.
    for step, rates in enumerate(model.seen):
        assert rates["blocks.0.drop_path"] == pytest.approx(ramp(step) / 2)
        assert rates["blocks.1.drop_path"] == pytest.approx(ramp(step))
        assert (rates["embed"], rates["locked"], rates["block_drop"]) == (0.2, 0.3, 0.25)

    def logged(site: str, leaf: str) -> list[float]:
        return list(logger.steps_of(f"dropout/{site}/{leaf}").values())

    assert all(len(logged(site, "p")) == len(data) for site in KINDS)
    assert all(len(logged(site, "realised")) == len(data) for site in KINDS)
    # Realised rates: each step's fraction within SIGMAS of the p it ran at, the units
    # counted as independent draws.
    for step, tokens in enumerate(data):
        # Embedding dropout: one draw per distinct token of the batch.
        assert abs(logged("embed", "realised")[step] - 0.2) <= binomial_bound(0.2, tokens.unique().numel())
        assert abs(logged("locked", "realised")[step] - 0.3) <= binomial_bound(0.3, BATCH * FEATURES) + 0.02
        for name in ("blocks.0.drop_path", "blocks.1.drop_path"):
            p = logged(name, "p")[step]
            assert abs(logged(name, "realised")[step] - p) <= binomial_bound(p, BATCH) + 1e-9
        # A position's drop correlates with the 25 positions whose 3 x 3 blocks can overlap it.
        positions = BATCH * STEPS * FEATURES / 25
        assert abs(logged("block_drop", "realised")[step] - 0.25) <= binomial_bound(0.25, positions)
    # The learned p: logged as it moves, and its relaxed drops at that p.
    learned = logged("concrete", "p")
    assert len(set(learned)) == len(data) and all(0 < p < 1 for p in learned)
    assert learned[-1] != pytest.approx(0.3, abs=1e-3) and model.concrete.p != learned[-1]  # one more step
    for p, realised in zip(learned, logged("concrete", "realised"), strict=True):
        # Counted over the nonzero inputs: DropBlock zeroed about a quarter of them.
        assert abs(realised - p) <= binomial_bound(p, BATCH * STEPS * FEATURES / 2)

    # Monte-Carlo: every site drops in the passes while the model stays in eval mode.
    model.eval()
    training_during_mc: dict[str, set[bool]] = {name: set() for name in KINDS}
    handles = [
        site.module.register_forward_pre_hook(
            lambda module, args, name=name: training_during_mc[name].add(module.training)
        )
        for name, site in find_sites(model).items()
    ]
    out = mc_predict(model, data[0][:4], n_samples=6, batched=False)
    for handle in handles:
        handle.remove()
    assert training_during_mc == {name: {True} for name in KINDS}
    assert out.variance.amax() > 0 and not model.training
    assert all(not m.training for m in model.modules())
