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
@pytest.mark.parametrize("grid,ratio,k", [(14, 0.5, 98), (14, 0.75, 49), (14, 0.9, 19),
                                          (8, 0.5, 32), (2, 0.9, 1)])
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
    # ratio 0.5, sigma 0.2 (a variance), 14 x 14: the centre is almost always kept, the corners ~30%
    # of the time
    gauss = keep_rate_map(14, 0.5, "gaussian")
    assert gauss[6:8, 6:8].min() > 0.99
    corners = torch.stack([gauss[0, 0], gauss[0, -1], gauss[-1, 0], gauss[-1, -1]])
    assert ((corners - 0.30).abs() < 0.04).all(), corners
    rand = keep_rate_map(14, 0.5, "random")
    assert ((rand - 0.5).abs() < 0.04).all()


def test_sigma_is_used_as_a_variance():
    # with sigma as a variance the density at the centre is 1 / (2 pi sigma); as a std it would be 1
    # / (2 pi sigma^2)
    pdf = masking.gaussian_pdf(3, 0.2)  # centres -1, 0, 1: the middle one is at the origin
    assert pdf[4].item() == pytest.approx(1 / (2 * torch.pi * 0.2))
    falloff = torch.exp(torch.tensor(-2 / (2 * 0.2))).item()
    assert pdf[0].item() == pytest.approx(pdf[4].item() * falloff)


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.8])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_keep_probability_agrees_with_sampling(sigma, ratio):
    prob = masking.keep_probability(14, ratio, "gaussian", sigma)
    assert prob.sum().item() == pytest.approx(masking.num_kept(14, ratio), abs=1e-6)
    # 4000 samples: the std of a keep-rate estimate is <= 0.008, and the large-N approximation is
    # good to ~0.01
    assert (keep_rate_map(14, ratio, "gaussian", sigma) - prob).abs().max() < 0.035


def test_smaller_sigma_concentrates_more():
    centre_share = [masking.keep_probability(14, 0.5, "gaussian", s)[4:10, 4:10].sum()
                    for s in (0.1, 0.2, 0.8)]
    assert centre_share[0] > centre_share[1] > centre_share[2]
    assert torch.allclose(masking.keep_probability(14, 0.5, "random"),
                          torch.full((14, 14), 0.5, dtype=torch.float64))


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


# ----------------------------------------------------------------------------- text masking

VOCAB = 100  # start token 98, end-of-text 99 (the largest id, as CLIP's), words 1..97, padding 0


def captions(eot_positions, context_length=16, seed=0):
    """(B, T) token ids: the start token, words, the end-of-text token at each given position, zero
    padding after."""
    g = torch.Generator().manual_seed(seed)
    eot = torch.tensor(eot_positions)[:, None]  # (B, 1)
    position = torch.arange(context_length)
    tokens = torch.randint(1, VOCAB - 2, (len(eot_positions), context_length), generator=g)
    tokens = torch.where(position < eot, tokens, 0).scatter(1, eot, VOCAB - 1)
    tokens[:, 0] = VOCAB - 2
    return tokens


# captions shorter and longer than the kept length 8, one filling the whole context
EOTS = [1, 3, 7, 8, 12, 15]


@pytest.mark.parametrize("mode", masking.TEXT_MODES)
@pytest.mark.parametrize("length", [2, 5, 8, 15])
def test_text_keep_is_sorted_unique_and_keeps_start_and_end_of_text(mode, length):
    tokens = captions(EOTS * 20)
    g = torch.Generator().manual_seed(0)
    keep = masking.text_keep_indices(tokens, length, mode, generator=g)
    assert keep.shape == (len(tokens), length) and keep.dtype == torch.long
    assert (keep[:, 1:] > keep[:, :-1]).all()  # strictly increasing: sorted and unique per row
    assert (keep[:, 0] == 0).all()  # the start token
    # the end-of-text token, where the tower pools
    assert (keep == tokens.argmax(-1, keepdim=True)).any(dim=1).all()


@pytest.mark.parametrize("mode", masking.TEXT_MODES)
def test_text_full_length_keeps_every_position_in_order(mode):
    keep = masking.text_keep_indices(captions(EOTS), 16, mode)
    assert torch.equal(keep, torch.arange(16).expand(len(EOTS), -1))


def test_truncate_keeps_the_first_positions_and_the_end_of_text():
    keep = masking.text_keep_indices(captions([3, 7, 8, 12, 15]), 8, "truncate")
    first8 = list(range(8))
    # caption ends inside the first 8 positions: CLIP's cut at 8
    assert keep.tolist() == [first8, first8,
                             # longer: 0..6 and the end-of-text
                             [*range(7), 8], [*range(7), 12], [*range(7), 15]]


def test_prioritized_drops_padding_before_any_caption_token():
    tokens = captions(EOTS * 50)
    eot = tokens.argmax(-1, keepdim=True)  # (B, 1)
    g = torch.Generator().manual_seed(0)
    keep = masking.text_keep_indices(tokens, 8, "prioritized", generator=g)
    long = (eot >= 7).squeeze(1)  # a caption of 8 tokens or more: no room for padding
    assert (keep[long] <= eot[long]).all()
    # shorter: every caption token kept, the rest is padding
    short_keep, short_eot = keep[~long], eot[~long]
    in_caption = (short_keep <= short_eot).sum(1)
    assert torch.equal(in_caption, short_eot.squeeze(1) + 1)


@pytest.mark.parametrize("mode", ["random", "prioritized"])
def test_random_text_masks_differ_per_sample_and_seed(mode):
    tokens = captions([15] * 8)  # 16-token captions: 14 words, 8 kept
    a = masking.text_keep_indices(tokens, 8, mode, generator=torch.Generator().manual_seed(1))
    b = masking.text_keep_indices(tokens, 8, mode, generator=torch.Generator().manual_seed(1))
    c = masking.text_keep_indices(tokens, 8, mode, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8  # each caption gets its own subset


def test_random_keeps_words_and_padding_alike_and_prioritized_keeps_words_uniformly():
    # length 8 of 16, caption ending at 7: random keeps each of the 14 middle positions with
    # probability 6/14, padding included; prioritized keeps all 8 caption positions (no padding); at
    # eot 12 it keeps each of the 11 words between start and end-of-text with probability 6/11
    n = 4000  # the std of a rate estimate is under 0.008
    cases = [("random", 7, 6 / 14, 15), ("random", 12, 6 / 14, 15), ("prioritized", 12, 6 / 11, 12)]
    for mode, eot, rate, last in cases:  # last: the last position that may be kept
        g = torch.Generator().manual_seed(0)
        keep = masking.text_keep_indices(captions([eot] * n), 8, mode, generator=g)
        rates = torch.bincount(keep.flatten(), minlength=16).double() / n
        middle = [p for p in range(1, last + 1) if p != eot]  # neither start nor end-of-text
        assert ((rates[middle] - rate).abs() < 0.04).all(), (mode, eot, rates)
        assert rates[0] == rates[eot] == 1 and rates[last + 1:].sum() == 0
    g = torch.Generator().manual_seed(0)
    keep = masking.text_keep_indices(captions([7] * 100), 8, "prioritized", generator=g)
    assert torch.equal(keep, torch.arange(8).expand(100, -1))


@pytest.mark.parametrize("length, mode, match", [(1, "random", "text length"),
                                                 (17, "truncate", "text length"),
                                                 (8, "block", "text masking mode")])
def test_text_bad_arguments_raise_clear_errors(length, mode, match):
    with pytest.raises(ValueError, match=match):
        masking.text_keep_indices(captions(EOTS), length, mode)
    with pytest.raises(ValueError, match="tokens must be"):
        # one caption without its batch dimension
        masking.text_keep_indices(captions(EOTS)[0], 8, "truncate")


@pytest.mark.parametrize("mode", masking.TEXT_MODES)
def test_text_masks_usable_inside_a_compiled_function(mode):
    def kept_tokens(tokens):  # (B, T) -> (B, 8): the kept token ids, in order
        return tokens.gather(1, masking.text_keep_indices(tokens, 8, mode))

    tokens = captions(EOTS)
    out = torch.compile(kept_tokens)(tokens)
    assert out.shape == (len(EOTS), 8) and (out[:, 0] == VOCAB - 2).all()
    # start and end-of-text survive under compilation too
    assert ((out == VOCAB - 1).sum(1) == 1).all()
    if mode == "truncate":
        assert torch.equal(out, kept_tokens(tokens))


def test_coverage_counts_the_patches_gaussian_masking_hardly_ever_keeps():
    # 91.8% of ViT-B/16's 14 x 14 grid keeps 16 patches; at the paper's sigma 0.2 most border
    # patches are kept less than 1% of the time, measured over draws as by the formula
    share, least = masking.coverage(14, 0.918, 0.2)
    g = torch.Generator().manual_seed(0)
    keep = masking.keep_indices(4000, 14, 0.918, "gaussian", 0.2, generator=g)
    drawn = torch.bincount(keep.flatten(), minlength=196).double() / 4000
    assert 0.55 < share < 0.75 and least < 1e-3
    assert abs((drawn < 0.01).double().mean().item() - share) < 0.06
    assert masking.coverage(14, 0.5, 0.2) == (0.0, pytest.approx(0.298, abs=0.01))
    assert masking.coverage(14, 0.918, 0.8)[0] == 0.0  # a flatter Gaussian reaches every patch


def test_auto_sigma_keeps_the_papers_sigma_until_patches_go_untrained():
    for grid in (14, 8):
        assert masking.auto_sigma(grid, 0.5) == masking.auto_sigma(grid, 0.75) == 0.2
        sigma = masking.auto_sigma(grid, 0.918)
        assert 0.6 < sigma < 1.0
        assert masking.coverage(grid, 0.918, sigma)[1] >= 0.01  # every patch kept >= 1%
        assert masking.coverage(grid, 0.918, 0.95 * sigma)[1] < 0.01  # and no flatter than that


def test_position_shift_is_the_distance_of_trained_positions_from_every_patch_once():
    g = torch.Generator().manual_seed(0)
    for grid, ratio, sigma in [(8, 0.75, 0.1), (8, 0.918, 0.2), (14, 0.75, 0.8)]:
        n = grid * grid
        keep = masking.keep_indices(4000, grid, ratio, "gaussian", sigma, generator=g)
        where = torch.bincount(keep.flatten(), minlength=n).double() / keep.numel()
        drawn = 0.5 * (where - 1 / n).abs().sum().item()  # measured over draws
        # keep_probability's large-N approximation is off by ~0.03 at 5 kept of 64
        assert masking.position_shift(grid, ratio, sigma) == pytest.approx(drawn, abs=0.04)
    # more centred or more masked: further from unmasked inference; a flat Gaussian is FLIP's
    shifts = [masking.position_shift(8, 0.75, s) for s in (0.1, 0.2, 0.4, 0.8)]
    assert shifts == sorted(shifts, reverse=True) and shifts[0] > 0.35
    assert masking.position_shift(8, 0.918, 0.2) > masking.position_shift(8, 0.75, 0.2)
    assert masking.position_shift(14, 0.5, 100.0) < 0.01
