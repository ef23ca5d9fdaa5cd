"""MCDropout's measurements in test and validate: each logged number against a direct
computation, OOD detection, regression, the dashboard's tags, and the DDP reduction."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import DropConnectLinear
from lightning_dropout.callbacks import MCDropout
from lightning_dropout.mc import mc_predict

SEED = 1234
N_SAMPLES = 12


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.3),
            DropConnectLinear(32, 32, p=0.3, activation="relu"),
            nn.Dropout(0.3),
            nn.Linear(32, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(n: int = 32, seed: int = 0, ood: bool = False) -> TensorDataset:
    """Three classes, each shifted along its own axis; out of distribution: no shift at all."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) * 0.5 + (0.0 if ood else nn.functional.one_hot(y, 6).float() * 3)
    return TensorDataset(x, y)


def trainer(tmp_path: Path, callbacks: list[L.Callback], logger: bool = False, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path, name="tb") if logger else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


@functools.cache
def trained_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Classifier()
    with tempfile.TemporaryDirectory() as root:
        trainer(Path(root), [], max_epochs=8).fit(
            model, DataLoader(data(96, seed=1), batch_size=16, shuffle=True)
        )
    return model.state_dict()


def fitted(tmp_path: Path) -> Classifier:
    """A classifier trained once per session (a copy each time)."""
    model = Classifier()
    model.load_state_dict(trained_weights())
    return model.eval()


def events(tmp_path: Path) -> EventAccumulator:
    (path,) = tmp_path.glob("tb/version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(path), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probs.max(-1)
    total = 0.0
    for b in range(bins):
        inside = (confidence > b / bins) & (confidence <= (b + 1) / bins)
        if inside.any():
            gap = (predicted[inside] == target[inside]).float().mean() - confidence[inside].mean()
            total += inside.sum().item() * gap.abs().item()
    return total / len(target)


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """P(positive scores higher than negative), ties counted half (Mann-Whitney)."""
    greater = (positives[:, None] > negatives[None, :]).float().mean()
    ties = (positives[:, None] == negatives[None, :]).float().mean()
    return (greater + 0.5 * ties).item()


def fpr_at_95_tpr(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """The lowest false-positive rate over thresholds that flag at least 95% of positives."""
    rates = [
        (negatives >= threshold).float().mean().item()
        for threshold in positives
        if (positives >= threshold).float().mean() >= 0.95
    ]
    return min(rates)


def classification_metrics(probs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    picked = probs.gather(1, target[:, None]).squeeze(1)
    one_hot = nn.functional.one_hot(target, probs.shape[1]).float()
    return {
        "accuracy": (probs.argmax(-1) == target).float().mean().item(),
        "nll": -picked.log().mean().item(),
        "brier": ((probs - one_hot) ** 2).sum(-1).mean().item(),
        "ece": expected_calibration_error(probs, target),
    }


def test_every_logged_number_matches_a_direct_computation(tmp_path: Path) -> None:
    model = fitted(tmp_path)
    inside, outside = data(40, seed=2), data(24, seed=3, ood=True)
    callback = MCDropout(N_SAMPLES, stages="test", ood_dataloader_idx=1, consistent=True, seed=SEED)
    loaders = [DataLoader(inside, batch_size=16), DataLoader(outside, batch_size=16)]
    logged = trainer(tmp_path, [callback], logger=True).test(model, loaders, verbose=False)[0]

    # With consistent masks the MC outputs do not depend on the batching: compute them whole.
    x, y = inside.tensors
    mc = mc_predict(model, x, N_SAMPLES, consistent=True, seed=SEED)
    mc_ood = mc_predict(model, outside.tensors[0], N_SAMPLES, consistent=True, seed=SEED)
    with torch.no_grad():
        det = model(x).softmax(-1)
    expected = {f"test/mc/{k}": v for k, v in classification_metrics(mc.mean, y).items()}
    expected |= {f"test/det/{k}": v for k, v in classification_metrics(det, y).items()}
    assert mc.standard_error is not None and mc.entropy is not None and mc_ood.entropy is not None
    assert mc.mutual_information is not None and mc_ood.mutual_information is not None
    expected["test/mc/standard_error"] = mc.standard_error.mean().item()
    expected["test/mc/ood_auroc_entropy"] = auroc(mc.entropy, mc_ood.entropy)
    expected["test/mc/ood_auroc_bald"] = auroc(mc.mutual_information, mc_ood.mutual_information)
    expected["test/mc/ood_fpr95_entropy"] = fpr_at_95_tpr(mc.entropy, mc_ood.entropy)
    for tag, value in expected.items():
        assert logged[tag] == pytest.approx(value, rel=1e-4, abs=1e-5), tag
    assert expected["test/mc/ood_auroc_entropy"] > 0.9  # the shifted set is told apart

    board = events(tmp_path)
    assert set(board.Tags()["scalars"]) >= set(expected)
    assert board.Tags()["images"] == ["test/mc/reliability"]
    histograms = {"test/mc/entropy", "test/mc/bald", "test/mc/ood_entropy", "test/mc/ood_bald"}
    assert set(board.Tags()["histograms"]) == histograms
    assert board.Histograms("test/mc/entropy")[0].histogram_value.num == len(x)
    png = board.Images("test/mc/reliability")[0]
    assert png.encoded_image_string[1:4] == b"PNG" and png.width > 400
    assert "custom_scalars__config__" in board.Tags()["tensors"]


class GaussianRegressor(L.LightningModule):
    """Returns (mean, log-variance); the test step checks that forward keeps that format."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
        self.formats: list[str] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x)
        return out[:, 0], out[:, 1]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        out = self(batch[0])
        self.formats.append(type(out).__name__)


def test_gaussian_regression_logs_nll_coverage_and_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GaussianRegressor().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 2, generator=g)
    y = x.sum(-1) + 0.3 * torch.randn(30, generator=g)
    callback = MCDropout(N_SAMPLES, stages=("test",), output="gaussian", consistent=True, seed=SEED)
    logged = trainer(tmp_path, [callback]).test(
        model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False
    )
    assert model.formats == ["tuple"] * 4
    mc = mc_predict(model, x, N_SAMPLES, output="gaussian", consistent=True, seed=SEED)
    nll = nn.functional.gaussian_nll_loss(mc.mean, y, mc.variance, full=True, eps=0.0).item()
    covered = ((y - mc.mean).abs() <= 1.6448536 * mc.variance.sqrt()).float().mean().item()
    assert logged[0]["test/mc/nll"] == pytest.approx(nll, rel=1e-4)
    assert logged[0]["test/mc/coverage90"] == pytest.approx(covered)
    assert logged[0]["test/mc/mse"] == pytest.approx(((mc.mean - y) ** 2).mean().item(), rel=1e-4)
    with torch.no_grad():
        mean, log_variance = model(x)
    det_nll = nn.functional.gaussian_nll_loss(mean, y, log_variance.exp(), full=True, eps=0.0).item()
    assert logged[0]["test/det/nll"] == pytest.approx(det_nll, rel=1e-4)
    assert "test/mc/ood_auroc_variance" not in logged[0]


def test_validation_inside_fit_is_measured_each_epoch_but_not_in_the_sanity_check(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = MCDropout(4, stages="validate")
    train, val = DataLoader(data(32), batch_size=16), DataLoader(data(16, seed=4), batch_size=8)
    trainer(tmp_path, [callback], logger=True, max_epochs=2, num_sanity_val_steps=1).fit(
        Classifier(), train, val
    )
    board = events(tmp_path)
    for tag in ("val/mc/accuracy", "val/det/ece", "val/mc/standard_error"):
        assert [event.step for event in board.Scalars(tag)] == [1, 3], tag
    assert len(board.Images("val/mc/reliability")) == 2
    assert "forward" not in vars(callback)


def test_missing_targets_and_missing_ood_batches_are_said(tmp_path: Path) -> None:
    model = Classifier().eval()
    images_only = DataLoader(TensorDataset(torch.randn(8, 6)), batch_size=4)

    class Inputs(Classifier):
        def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self(batch[0])

    with pytest.warns(UserWarning, match="no metrics from the targets: a list batch holds no"):
        trainer(tmp_path, [MCDropout(2, stages="test")]).test(Inputs(), images_only, verbose=False)
    with pytest.warns(UserWarning, match="no OOD scores: test dataloader 1"):
        trainer(tmp_path, [MCDropout(2, stages="test", ood_dataloader_idx=1)]).test(
            model, DataLoader(data(8), batch_size=4), verbose=False
        )
    keyed = [{"features": x, "class": y} for x, y in data(8)]

    class Keyed(Classifier):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            self(batch["features"])

    logged = trainer(tmp_path, [MCDropout(2, stages="test", target="class")]).test(
        Keyed().eval(), DataLoader(keyed, batch_size=4), verbose=False
    )
    assert 0.0 <= logged[0]["test/mc/accuracy"] <= 1.0


def test_new_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="ood_dataloader_idx names a test dataloader"):
        MCDropout(ood_dataloader_idx=1)
    with pytest.raises(ValueError, match="ood_dataloader_idx must be an int >= 0"):
        MCDropout(stages="test", ood_dataloader_idx=-1)
    with pytest.raises(TypeError, match="target"):
        MCDropout(target=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sites must hold non-empty"):
        MCDropout(sites=[""])
    with pytest.raises(TypeError, match="seed"):
        MCDropout(seed="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_bins"):
        MCDropout(n_bins=0)


def test_sites_and_consistency_reach_the_loop(tmp_path: Path) -> None:
    model = fitted(tmp_path)
    loader = DataLoader(data(16, seed=2), batch_size=8)
    runs = [
        trainer(tmp_path, [MCDropout(4, stages="test", consistent=True, seed=s, sites="net.5")]).test(
            model, loader, verbose=False
        )[0]["test/mc/nll"]
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] != runs[2]
    with pytest.raises(ValueError, match="pattern 'head' matches no dropout site"):
        trainer(tmp_path, [MCDropout(2, stages="test", sites="head")]).test(model, loader, verbose=False)


@pytest.mark.skipif(
    bool(os.environ.get("LIGHTNING_DROPOUT_SKIP_DDP_TESTS")),
    reason="LIGHTNING_DROPOUT_SKIP_DDP_TESTS is set",
)
def test_two_gloo_processes_give_the_single_process_numbers_on_the_union(tmp_path: Path) -> None:
    model = fitted(tmp_path)
    # 32 + 16 samples, batches of 8: each rank gets half of each set, nothing padded.
    loaders = [
        DataLoader(data(32, seed=2), batch_size=8),
        DataLoader(data(16, seed=3, ood=True), batch_size=8),
    ]

    def run(**kwargs: Any) -> dict[str, float]:
        callback = MCDropout(N_SAMPLES, stages="test", ood_dataloader_idx=1, consistent=True, seed=SEED)
        return trainer(tmp_path, [callback], **kwargs).test(model, loaders, verbose=False)[0]

    single = run()
    ddp = run(devices=2, strategy="ddp_spawn")
    measured = [tag for tag in single if tag.startswith(("test/mc/", "test/det/"))]
    assert len(measured) == 12
    for tag in measured:
        assert ddp[tag] == pytest.approx(single[tag], rel=1e-5, abs=1e-6), tag


class Recurrent(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 3))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.head(self.lstm(batch[0].unsqueeze(1))[0][:, -1])


def test_consistent_masks_name_the_sites_they_cannot_reach(tmp_path: Path) -> None:
    callback = MCDropout(3, consistent=True, seed=0)
    with pytest.warns(UserWarning, match=r"independent masks for every input: lstm.dropout \(drawn inside"):
        out = trainer(tmp_path, [callback]).predict(Recurrent().eval(), DataLoader(data(8), batch_size=4))
    assert out is not None and len(out) == 2
