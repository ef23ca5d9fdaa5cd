from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dropout.metrics import CoActivation
from lightning_dropout.metrics.functional import units_of


def correlated(n: int, d: int, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) @ mixing + offset


def streamed(data: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
    metric = CoActivation(data.shape[1])
    for chunk in torch.split(data, sizes):
        metric.update(chunk)
    return metric.compute()


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_corr_equals_numpy_corrcoef_streamed_in_chunks(offset: float) -> None:
    data = correlated(1000, 12, offset=offset)
    out = streamed(data, [1, 99, 400, 500])
    expected = np.corrcoef(data.numpy(), rowvar=False)
    np.testing.assert_allclose(out["corr"].numpy(), expected, atol=1e-9)
    off_diagonal = ~np.eye(12, dtype=bool)
    assert out["mean_abs_corr"].item() == pytest.approx(np.abs(expected[off_diagonal]).mean(), abs=1e-9)
    np.testing.assert_allclose(out["mean_activation"].numpy(), data.numpy().mean(0), atol=1e-9)


def test_decov_and_sparsity_by_their_formulas() -> None:
    data = torch.relu(correlated(500, 6, seed=1))
    out = streamed(data, [200, 300])
    cov = np.cov(data.numpy(), rowvar=False, bias=True)  # 1/N, as in Cogswell et al.
    expected_decov = 0.5 * ((cov**2).sum() - (np.diag(cov) ** 2).sum())
    assert out["decov"].item() == pytest.approx(expected_decov, rel=1e-9)
    assert out["sparsity"].item() == pytest.approx((data == 0).double().mean().item())
    assert 0.3 < out["sparsity"].item() < 0.7  # the data does have zeros to count


def test_constant_unit_correlates_zero_never_nan() -> None:
    data = correlated(200, 4)
    data[:, 2] = 3.7
    out = streamed(data, [50, 150])
    assert not torch.isnan(out["corr"]).any()
    assert (out["corr"][2] == 0).all() and (out["corr"][:, 2] == 0).all()
    assert out["corr"][0, 0].item() == pytest.approx(1.0)


def test_channel_inputs_are_reduced_per_channel() -> None:
    acts = torch.randn(16, 3, 4, 4)
    acts[:, 1, :2] = 0.0
    metric = CoActivation(3)
    metric.update(acts)
    out = metric.compute()
    channel_means = acts.mean(dim=(2, 3)).double()
    np.testing.assert_allclose(out["mean_activation"].numpy(), channel_means.mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(
        out["corr"].numpy(), np.corrcoef(channel_means.numpy(), rowvar=False), atol=1e-9
    )
    assert out["sparsity"].item() == pytest.approx((acts == 0).double().mean().item())
    assert units_of(acts).shape == (16, 3)


def test_merged_states_equal_one_stream() -> None:
    # What DDP does: the "sum" states of the ranks are added.
    data = correlated(300, 5)
    first, second = CoActivation(5), CoActivation(5)
    first.update(data[:120])
    second.update(data[120:])
    first.merge_state(second)
    np.testing.assert_allclose(first.compute()["corr"].numpy(), streamed(data, [300])["corr"].numpy())


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="num_units"):
        CoActivation(0)
    with pytest.raises(ValueError, match="num_units=3"):
        CoActivation(3).update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="acts"):
        CoActivation(3).update(torch.randn(4))
