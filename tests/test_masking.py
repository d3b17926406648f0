"""The contract of masking.keep_indices and masking.keep_probability."""

import pytest
import torch

import masking


def keep_rate_map(grid, ratio, mode, sigma=0.2, samples=4000, seed=0):
    """(G, G) fraction of `samples` draws in which each patch was kept."""
    g = torch.Generator().manual_seed(seed)
    keep = masking.keep_indices(samples, grid, ratio, mode, sigma, generator=g)
    counts = torch.bincount(keep.flatten(), minlength=grid * grid).double()
    return (counts / samples).view(grid, grid)


@pytest.mark.parametrize("mode", masking.MODES)
@pytest.mark.parametrize("grid,ratio,k", [(14, 0.5, 98), (14, 0.75, 49), (14, 0.9, 19), (8, 0.5, 32), (2, 0.9, 1)])
def test_shape_dtype_and_unique_sorted_rows(mode, grid, ratio, k):
    keep = masking.keep_indices(16, grid, ratio, mode)
    assert keep.shape == (16, k) and keep.dtype == torch.long
    assert keep.min() >= 0 and keep.max() < grid * grid
    assert (keep[:, 1:] > keep[:, :-1]).all()  # strictly increasing: sorted and unique per row


@pytest.mark.parametrize("mode", masking.MODES)
def test_ratio_zero_keeps_every_patch_in_order(mode):
    keep = masking.keep_indices(3, 14, 0.0, mode)
    assert torch.equal(keep, torch.arange(196).expand(3, -1))


@pytest.mark.parametrize("mode", masking.MODES)
def test_seeded_generator_is_deterministic_and_rows_differ(mode):
    a = masking.keep_indices(8, 14, 0.5, mode, generator=torch.Generator().manual_seed(1))
    b = masking.keep_indices(8, 14, 0.5, mode, generator=torch.Generator().manual_seed(1))
    c = masking.keep_indices(8, 14, 0.5, mode, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8  # each sample gets its own mask


def test_keep_rates_match_the_paper_setting():
    # ratio 0.5, sigma 0.2 (a variance), 14 x 14: the centre is almost always kept, the corners ~30% of the time
    gauss = keep_rate_map(14, 0.5, "gaussian")
    assert gauss[6:8, 6:8].min() > 0.99
    corners = torch.stack([gauss[0, 0], gauss[0, -1], gauss[-1, 0], gauss[-1, -1]])
    assert ((corners - 0.30).abs() < 0.04).all(), corners
    rand = keep_rate_map(14, 0.5, "random")
    assert ((rand - 0.5).abs() < 0.04).all()


def test_sigma_is_used_as_a_variance():
    # with sigma as a variance the density at the centre is 1 / (2 pi sigma); as a std it would be 1 / (2 pi sigma^2)
    pdf = masking.gaussian_pdf(3, 0.2)  # centres -1, 0, 1: the middle one is at the origin
    assert pdf[4].item() == pytest.approx(1 / (2 * torch.pi * 0.2))
    assert pdf[0].item() == pytest.approx(pdf[4].item() * torch.exp(torch.tensor(-2 / (2 * 0.2))).item())


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.8])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_keep_probability_agrees_with_sampling(sigma, ratio):
    prob = masking.keep_probability(14, ratio, "gaussian", sigma)
    assert prob.sum().item() == pytest.approx(masking.num_kept(14, ratio), abs=1e-6)
    # 4000 samples: the std of a keep-rate estimate is <= 0.008, and the large-N approximation is good to ~0.01
    assert (keep_rate_map(14, ratio, "gaussian", sigma) - prob).abs().max() < 0.035


def test_smaller_sigma_concentrates_more():
    centre_share = [masking.keep_probability(14, 0.5, "gaussian", s)[4:10, 4:10].sum() for s in (0.1, 0.2, 0.8)]
    assert centre_share[0] > centre_share[1] > centre_share[2]
    assert torch.allclose(masking.keep_probability(14, 0.5, "random"), torch.full((14, 14), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(ratio=1.5), "ratio"),
    (dict(sigma=0.0), "sigma"), (dict(grid_size=0), "grid_size"), (dict(mode="center"), "mode"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(batch_size=2, grid_size=14, ratio=0.5, mode="gaussian", sigma=0.2) | kwargs
    with pytest.raises(ValueError, match=match):
        masking.keep_indices(**args)


def test_usable_inside_a_compiled_function():
    def masked_mean(x):  # (B, N, D) -> mean over the kept tokens
        keep = masking.keep_indices(x.shape[0], 4, 0.5, "gaussian", device=x.device)
        return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])).mean(1)

    out = torch.compile(masked_mean)(torch.randn(3, 16, 5))
    assert out.shape == (3, 5) and torch.isfinite(out).all()
