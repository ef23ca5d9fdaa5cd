"""Monte-Carlo inference: modes, replication, DropConnect replicas, summaries, errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_dropout import (
    DropConnect,
    DropConnectLinear,
    Dropout,
    EmbeddingDropout,
    MCOutput,
)
from lightning_dropout.mc import independent_replica_masks, mc_dropout, mc_predict, replicate, summarize
from tests._models import conv_net


def trained_state(net: nn.Module) -> nn.Module:
    # Non-trivial BatchNorm statistics, then eval as Lightning leaves it.
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 2, 5, 5))
    return net.eval()


def test_mc_dropout_flips_only_dropout_layers_and_restores_after_exception() -> None:
    inner_bn = nn.BatchNorm1d(3)
    net = nn.Sequential(
        nn.BatchNorm1d(3),
        Dropout(),
        DropConnect(nn.Sequential(nn.Linear(3, 3), inner_bn), names=("0.weight",)),
    )
    net.eval()
    net[0].train()  # a mixed state must come back exactly
    before = {name: m.training for name, m in net.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), mc_dropout(net):
        assert net[1].training and net[2].training
        assert net[0].training and not net[2].module.training and not inner_bn.training
        raise RuntimeError("boom")
    assert {name: m.training for name, m in net.named_modules()} == before


def test_mc_predict_leaves_batchnorm_statistics_bitwise_unchanged() -> None:
    net = trained_state(conv_net())
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {name: m.training for name, m in net.named_modules()}
    for batched in (True, False):
        out = mc_predict(net, torch.randn(6, 2, 5, 5), n_samples=7, batched=batched)
        assert out.variance.sum() > 0
    for key, value in net.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert {name: m.training for name, m in net.named_modules()} == flags
    assert all(m.mask_groups == 1 for m in net.modules() if hasattr(m, "mask_groups"))


def test_replicas_of_a_batched_pass_get_independent_dropconnect_masks() -> None:
    # A model whose only randomness is DropConnect with one mask per call: without
    # per-replica masks every replica of the batched pass would be identical.
    embedding = nn.Sequential(EmbeddingDropout(nn.Embedding(40, 6), p=0.5), nn.Flatten())
    inputs = [torch.randn(3, 6), torch.randn(3, 6), torch.randint(0, 40, (3, 20))]
    for layer, x in zip(
        (DropConnectLinear(6, 4, p=0.5), DropConnect(nn.Linear(6, 4), p=0.5), embedding), inputs, strict=True
    ):
        out = mc_predict(layer.eval(), x, n_samples=10, output="regression", return_samples=True)
        assert out.samples is not None
        distinct = {tuple(s.flatten().tolist()) for s in out.samples}
        assert len(distinct) == 10
        # Within one replica one mask serves the whole batch, as in training.
        assert all(m.mask_groups == 1 for m in layer.modules() if hasattr(m, "mask_groups"))


def test_dropconnect_wrapper_around_rnn_refuses_batched_mode_clearly() -> None:
    net = DropConnect(nn.GRU(3, 4, batch_first=True), names=("weight_hh_l0",)).eval()
    with pytest.raises(NotImplementedError, match="batched=False"):
        mc_predict(lambda_model(net), torch.randn(2, 5, 3), n_samples=3, output="regression")
    out = mc_predict(lambda_model(net), torch.randn(2, 5, 3), n_samples=3, batched=False, output="regression")
    assert out.mean.shape == (2, 5, 4)


class FirstOutput(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def lambda_model(rnn: nn.Module) -> nn.Module:
    return FirstOutput(rnn)


def test_batched_mode_refuses_a_model_that_mixes_the_batch() -> None:
    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(x, 0.5, self.training).sum(0, keepdim=True)

    net = nn.Sequential(nn.Dropout(0.5), Pool())
    with pytest.raises(ValueError, match=r"use batched=False"):
        mc_predict(net, torch.randn(4, 3), n_samples=4, output="regression")


def test_batched_and_looped_agree_in_distribution() -> None:
    # Per output entry, the MC mean over n passes has standard error sigma / sqrt(n); the
    # difference of two independent means has sigma * sqrt(2 / n). Allow 5 of those.
    net = nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        DropConnectLinear(16, 16, p=0.3, activation="relu"),
        Dropout(0.2),
        DropConnect(nn.Linear(16, 3), p=0.2),
    )
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 6))
    net.eval()
    x = torch.randn(4, 6)
    n = 200
    torch.manual_seed(1)
    batched = mc_predict(net, x, n_samples=n, batched=True, chunk_size=100, output="regression")
    torch.manual_seed(2)
    looped = mc_predict(net, x, n_samples=n, batched=False, output="regression")
    sigma = ((batched.variance + looped.variance) / 2).sqrt()
    z = (batched.mean - looped.mean).abs() / (sigma * math.sqrt(2 / n) + 1e-12)
    assert z.max() < 5, z.max()
    # Variances: relative standard error of a variance estimate is about sqrt(2 / n) for
    # near-Gaussian outputs; allow 5 sigma on the mean ratio over entries.
    ratio = (batched.variance.mean() / looped.variance.mean()).item()
    assert abs(ratio - 1) < 5 * math.sqrt(2 / n)


def test_summaries_match_definitions() -> None:
    logits = torch.randn(5, 4, 3)
    out = MCOutput.from_samples(logits, return_samples=True)
    probs = logits.softmax(-1)
    mean = probs.mean(0)
    entropy = -(mean * mean.log()).sum(-1)
    expected_entropy = -(probs * probs.log()).sum(-1).mean(0)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.variance, probs.var(0, correction=0))
    torch.testing.assert_close(out.entropy, entropy)
    torch.testing.assert_close(out.mutual_information, entropy - expected_entropy)
    assert out.samples is not None and torch.equal(out.samples, probs)
    torch.testing.assert_close(out.log_mean().softmax(-1), mean)
    # Streaming over uneven chunks gives the same statistics.
    chunked = summarize([logits[:2], logits[2:3], logits[3:]])
    torch.testing.assert_close(chunked.variance, out.variance)
    torch.testing.assert_close(chunked.mutual_information, out.mutual_information)
    # Class dimension 1 (segmentation-style outputs).
    seg = MCOutput.from_samples(torch.randn(3, 2, 4, 5, 5), class_dim=1)
    assert seg.mean.shape == (2, 4, 5, 5) and seg.entropy is not None and seg.entropy.shape == (2, 5, 5)
    torch.testing.assert_close(seg.mean.sum(1), torch.ones(2, 5, 5))


def test_identical_passes_have_no_mutual_information_and_regression_no_entropy() -> None:
    out = MCOutput.from_samples(torch.tensor([[0.2, 0.8]]).expand(4, 1, 2), output="probs")
    assert out.mutual_information is not None and out.mutual_information.abs().max() < 1e-6
    reg = MCOutput.from_samples(torch.randn(4, 3, 1), output="regression")
    assert reg.entropy is None and reg.mutual_information is None
    torch.testing.assert_close(reg.log_mean(), reg.mean)


def test_bad_arguments_raise_naming_the_argument() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Dropout()).eval()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="n_samples"):
        mc_predict(net, x, n_samples=0)
    with pytest.raises(TypeError, match="n_samples"):
        mc_predict(net, x, n_samples=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        mc_predict(net, x, chunk_size=0)
    with pytest.raises(ValueError, match="output"):
        mc_predict(net, x, output="softmax")
    with pytest.raises(TypeError, match="batched"):
        mc_predict(net, x, batched=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="class_dim"):
        mc_predict(net, x, class_dim="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output='regression'"):
        mc_predict(nn.Sequential(nn.Linear(3, 1), nn.Dropout()), x)
    with pytest.raises(TypeError, match="must return a tensor"):
        mc_predict(DictNet(), x, output="regression")
    with pytest.warns(UserWarning, match="no dropout site"):
        mc_predict(nn.Linear(3, 2), x, n_samples=2)
    assert not net.training


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x}


def test_replicate_nested_batches_and_refuse_ragged_ones() -> None:
    batch = {"x": torch.arange(4).reshape(2, 2), "y": (torch.tensor([7, 8]), "tag")}
    out = replicate(batch, 3)
    assert out["x"][:, 0].tolist() == [0, 2, 0, 2, 0, 2]
    assert out["y"][0].tolist() == [7, 8, 7, 8, 7, 8] and out["y"][1] == "tag"
    with pytest.raises(ValueError, match="different first dimensions"):
        replicate((torch.zeros(2, 1), torch.zeros(3)), 2)
    with pytest.raises(ValueError, match="0-dimensional.*batched=False"):
        replicate((torch.zeros(2, 1), torch.tensor(3)), 2)


def test_independent_replica_masks_spare_per_sample_layers_and_restore() -> None:
    per_sample = DropConnectLinear(2, 2, per_sample=True)
    shared = DropConnectLinear(2, 2)
    shared.mask_groups = 2
    net = nn.Sequential(per_sample, shared)
    with pytest.raises(RuntimeError), independent_replica_masks(net, 5):
        assert (per_sample.mask_groups, shared.mask_groups) == (1, 5)
        raise RuntimeError
    assert (per_sample.mask_groups, shared.mask_groups) == (1, 2)


def test_mc_module_does_not_import_lightning() -> None:
    code = "import sys, lightning_dropout.mc; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class Heteroscedastic(nn.Module):
    """A Gaussian regressor with known uncertainty: the predicted mean of input x is x times
    the mean of ``units`` inverted dropout masks (epistemic variance x^2 p / ((1 - p) units));
    the predicted noise level is 0.1 + |x|, deterministic (aleatoric variance (0.1 + |x|)^2)."""

    def __init__(self, units: int = 64, p: float = 0.5, pair: bool = True) -> None:
        super().__init__()
        self.units, self.pair = units, pair
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        mean = self.drop(x.expand(-1, self.units)).mean(-1)
        log_variance = 2 * torch.log(0.1 + x.abs().squeeze(-1))
        return (mean, log_variance) if self.pair else torch.stack([mean, log_variance], -1)


def test_gaussian_output_splits_aleatoric_and_epistemic_on_a_heteroscedastic_problem() -> None:
    x = torch.linspace(-2, 2, 9).unsqueeze(-1)
    n = 4000
    out = mc_predict(Heteroscedastic().eval(), x, n, output="gaussian", seed=0)
    assert out.aleatoric is not None and out.epistemic is not None and out.entropy is None
    torch.testing.assert_close(out.aleatoric, (0.1 + x.squeeze(-1).abs()) ** 2)
    torch.testing.assert_close(out.variance, out.aleatoric + out.epistemic)
    true_epistemic = x.squeeze(-1) ** 2 * 0.5 / (0.5 * 64)
    # The sample variance of n near-normal values has relative sd sqrt(2 / (n - 1)) = 2.2%:
    # within 5 sigma, 11%.
    moving = true_epistemic > 0
    ratio = out.epistemic[moving] / true_epistemic[moving]
    assert ((ratio - 1).abs() < 5 * math.sqrt(2 / (n - 1))).all(), ratio
    assert out.epistemic[~moving].item() == 0.0
    # The mean is x within 5 standard errors (the error the output itself reports).
    assert ((out.mean - x.squeeze(-1)).abs() <= 5 * out.standard_error + 1e-7).all()
    # A stacked last dimension is the same output as a pair.
    stacked = mc_predict(Heteroscedastic(pair=False).eval(), x, n, output="gaussian", seed=0)
    torch.testing.assert_close(stacked.variance, out.variance)
    prediction = out.log_mean()
    torch.testing.assert_close(prediction[..., 1].exp(), out.variance)
    with pytest.raises(ValueError, match="last dimension of size 2"):
        mc_predict(nn.Sequential(nn.Linear(1, 3), nn.Dropout()), x, 2, output="gaussian")


def test_standard_error_and_the_entropy_split_match_their_definitions() -> None:
    logits = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(1))
    out = summarize([logits[:3], logits[3:]], return_samples=True)
    probs = logits.softmax(-1)
    torch.testing.assert_close(out.standard_error, (probs.var(0, unbiased=True) / 7).sqrt())
    assert out.entropy is not None and out.aleatoric is not None and out.epistemic is not None
    torch.testing.assert_close(out.aleatoric, -torch.special.xlogy(probs, probs).sum(-1).mean(0))
    torch.testing.assert_close(out.aleatoric + out.epistemic, out.entropy)
    one = summarize([logits[:1]], output="regression")
    assert torch.isinf(one.standard_error).all() and one.aleatoric is None
    assert torch.equal(one.epistemic, one.variance)


class Wrapped(nn.Module):
    """The same network behind a plain forward: no prefix can be split off."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_sites_restrict_the_sampling_to_matching_sites() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5)).eval()
    seen: list[torch.Tensor] = []
    net[1].register_forward_hook(lambda module, args, output: seen.append(torch.equal(args[0], output)))
    out = mc_predict(Wrapped(net), torch.randn(3, 4), 5, sites="net.3", output="regression", batched=False)
    assert seen == [True] * 5 and (out.variance > 0).any()
    with pytest.raises(ValueError, match="pattern 'head' matches no dropout site"):
        mc_predict(net, torch.randn(3, 4), 5, sites="head")


@pytest.mark.parametrize("batched", [True, False])
def test_the_deterministic_prefix_runs_once_and_gives_the_same_samples(batched: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU(),
        DropConnectLinear(16, 16, p=0.3), nn.Dropout(0.3), nn.Linear(16, 3),
    ).eval()  # fmt: skip
    calls: list[int] = []
    net[4].register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    x = torch.randn(5, 6)
    split = mc_predict(net, x, 8, batched=batched, sites=["6", "7"], seed=3, return_samples=True)
    assert calls == [5]  # children 0-5 ran once on the batch
    calls.clear()
    whole = mc_predict(
        Wrapped(net), x, 8, batched=batched, sites=["net.6", "net.7"], seed=3, return_samples=True
    )
    assert sum(calls) == 8 * 5
    assert split.samples is not None and whole.samples is not None
    torch.testing.assert_close(split.samples, whole.samples)
    # Every site dropping: the prefix is what comes before the first dropout.
    calls.clear()
    mc_predict(net, x, 8, batched=batched, seed=3)
    assert sum(calls) == 8 * 5


def test_a_seed_reproduces_the_samples_and_leaves_the_global_stream_alone() -> None:
    net, x = conv_net().eval(), torch.randn(3, 2, 5, 5)
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    first = mc_predict(net, x, 6, seed=5, return_samples=True)
    assert torch.equal(torch.rand(2), expected)
    again = mc_predict(net, x, 6, seed=5, return_samples=True)
    other = mc_predict(net, x, 6, seed=6, return_samples=True)
    assert first.samples is not None and again.samples is not None and other.samples is not None
    assert torch.equal(first.samples, again.samples) and not torch.equal(first.samples, other.samples)
    with pytest.raises(TypeError, match="seed"):
        mc_predict(net, x, 2, seed=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="consistent"):
        mc_predict(net, x, 2, consistent="yes")  # type: ignore[arg-type]


def test_auto_passes_reach_the_tolerance_they_promise() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).eval()
    x = torch.randn(20, 5)
    tolerance = 0.01
    out = mc_predict(net, x, n_samples="auto", tolerance=tolerance, seed=1)
    assert out.standard_error is not None and float(out.standard_error.max()) <= tolerance
    assert 8 <= out.n_samples < 1000
    reference = mc_predict(net, x, n_samples=4000, seed=2).mean
    # The promise: the mean is within the tolerance's sigmas of the many-pass mean.
    error = (out.mean - reference).abs()
    assert float((error <= 3 * tolerance).float().mean()) >= 0.95
    assert float(error.max()) <= 5 * tolerance
    looser = mc_predict(net, x, n_samples="auto", tolerance=4 * tolerance, seed=1)
    assert looser.n_samples < out.n_samples
    with pytest.warns(UserWarning, match="max_samples=10"):
        capped = mc_predict(net, x, n_samples="auto", tolerance=1e-4, max_samples=10, seed=1)
    assert capped.n_samples == 10


@pytest.mark.parametrize("batched", [True, False])
def test_auto_passes_continue_one_sequence_of_consistent_masks(batched: bool) -> None:
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).eval()
    x = torch.randn(6, 4)
    auto = mc_predict(net, x, n_samples="auto", tolerance=0.02, consistent=True, seed=3, batched=batched)
    fixed = mc_predict(net, x, n_samples=auto.n_samples, consistent=True, seed=3, batched=batched)
    assert torch.allclose(auto.mean, fixed.mean, atol=1e-6)


def test_a_temperature_tempers_every_pass_before_the_average() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).eval()
    x = torch.randn(5, 4)
    out = mc_predict(net, x, n_samples=6, temperature=2.0, seed=0)
    raw = mc_predict(net, x, n_samples=6, seed=0, output="regression", return_samples=True)
    assert raw.samples is not None and out.temperature == 2.0
    assert torch.allclose(out.mean, (raw.samples / 2.0).softmax(-1).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        mc_predict(net, x, n_samples=2, output="regression", temperature=2.0)
