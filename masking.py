"""
Which image patches survive: FLIP's random masking and GDM-FLIP's centred (Gaussian) masking.

FLIP (arXiv 2212.00794) drops a random fraction `ratio` of the patches of every image during
pre-training and encodes only the kept ones. GDM-FLIP (a.k.a. GLIP, arXiv 2403.15837) keeps the same
number of patches but prefers those near the image centre, where photographers put the subject. The
whole difference is one line in `keep_indices`: the random score of each patch gets the value of a
2-D Gaussian density at the patch centre added.

    >>> keep = keep_indices(batch_size=2, grid_size=14, ratio=0.5, mode="gaussian", sigma=0.2)
    >>> keep.shape        # 98 of the 196 patches of a 224 px / patch 16 image, per sample
    torch.Size([2, 98])

FLIP also shortens the captions; `text_keep_indices` picks the L of T token positions each caption
keeps (truncate | random | prioritized), the start and end-of-text tokens always among them.

Run `python masking.py` to print keep-probability maps as text, and the three text masks of one
caption.
"""

import math

import torch

MODES = ("random", "gaussian")


def num_kept(grid_size, ratio):
    """K: how many of the G*G patches survive (at least one, so the image tower always sees
    something)."""
    return max(1, int(grid_size * grid_size * (1 - ratio)))


def gaussian_pdf(grid_size, sigma, device=None):
    """(G*G,) density of N(0, sigma * I) at the patch centres, laid on linspace(-1, 1, G) in x and
    y, row-major.

    NB: the paper calls this parameter sigma (0.1, 0.2, 0.8 in its figure; 0.2 by default) and the
    reference code uses it as the covariance diagonal, i.e. as a *variance*, not a standard
    deviation. We do the same so that `--sigma 0.2` means what the paper means: std = sqrt(0.2) ~
    0.45 in units of half the image width.
    """
    coords = torch.linspace(-1, 1, grid_size, device=device)
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each; row index is y
    sq_dist = (x * x + y * y).flatten()  # (G*G,)
    # 2-D normal with covariance sigma*I: det = sigma^2, so the normaliser is 1 / (2 pi sigma)
    return torch.exp(-sq_dist / (2 * sigma)) / (2 * math.pi * sigma)


def check_args(grid_size, ratio, mode, sigma):
    if mode not in MODES:
        raise ValueError(f"unknown masking mode {mode!r}; expected one of {MODES}")
    if not 0 <= ratio < 1:
        raise ValueError(f"masking ratio must be in [0, 1), got {ratio}")
    if not sigma > 0:
        raise ValueError(f"sigma (the Gaussian's variance) must be > 0, got {sigma}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")


def keep_indices(batch_size, grid_size, ratio, mode, sigma=0.2, device=None, generator=None):
    """(B, K) LongTensor: the patches each sample keeps, numbered 0..G*G-1 row-major, sorted
    ascending.

    Built on `device` with no host-device synchronisation, vectorised over the batch. The class
    token is not counted: the model always keeps it. ratio 0 keeps every patch, in order.
    """
    check_args(grid_size, ratio, mode, sigma)
    n, k = grid_size * grid_size, num_kept(grid_size, ratio)
    scores = torch.rand(batch_size, n, device=device, generator=generator)  # (B, N) u ~ U(0, 1)
    if mode == "gaussian":  # GDM-FLIP: u + pdf(x, y); FLIP: u alone
        scores = scores + gaussian_pdf(grid_size, sigma, device=scores.device)
    keep = scores.topk(k, dim=1, sorted=False).indices  # (B, K) the K highest scores survive
    # sorted costs little and keeps the kept tokens in raster order (ratio 0 -> 0, 1, ..., N-1)
    return keep.sort(dim=1).values


def keep_probability(grid_size, ratio, mode, sigma=0.2):
    """(G, G) probability that each patch is kept, for figures and tests.

    Random masking keeps every patch with probability K/N. For Gaussian masking, patch i survives
    when u_i + pdf_i beats the K-th largest score t. With N patches the threshold barely moves from
    sample to sample, so P(keep_i) ~= P(u_i > t - pdf_i) = clip(1 - t + pdf_i, 0, 1), with t chosen
    so that the probabilities add up to K. This large-N approximation agrees with a Monte Carlo
    estimate from keep_indices to about 0.01 at G = 14.
    """
    check_args(grid_size, ratio, mode, sigma)
    n, k = grid_size * grid_size, num_kept(grid_size, ratio)
    if mode == "random":
        return torch.full((grid_size, grid_size), k / n, dtype=torch.float64)
    pdf = gaussian_pdf(grid_size, sigma).double()
    prob = lambda t: (1 - t + pdf).clamp(0, 1)  # noqa: E731
    # sum(prob) is N at lo and 0 at hi, decreasing in t
    lo, hi = pdf.min().item(), 1 + pdf.max().item()
    for _ in range(100):  # bisection on the threshold
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prob(mid).sum() > k else (lo, mid)
    return prob((lo + hi) / 2).view(grid_size, grid_size)


def coverage(grid_size, ratio, sigma, floor=0.01):
    """(share of the patches Gaussian masking keeps with probability below `floor`, the smallest
    keep probability), from keep_probability. A patch kept less than 1% of the time hardly trains
    its positional embedding, yet inference unmasking feeds every one of them."""
    p = keep_probability(grid_size, ratio, "gaussian", sigma)
    return (p < floor).double().mean().item(), p.min().item()


def position_shift(grid_size, ratio, sigma):
    """How far the positions training encodes are from those unmasked inference encodes: the total
    variation distance between keep_probability / K (where a kept token sits) and 1 / N (every
    patch once). 0 for random masking; 1 would mean training never saw any position inference
    uses. Unlike `coverage`, it counts a patch kept 8% of the time where the average is 25% as
    under-trained too (docs/results.md#sigma)."""
    p = keep_probability(grid_size, ratio, "gaussian", sigma).flatten()
    return 0.5 * (p / p.sum() - 1 / p.numel()).abs().sum().item()


def auto_sigma(grid_size, ratio, floor=0.01, sigma=0.2):
    """`--sigma auto`: the paper's sigma where every patch keeps a keep probability of at least
    `floor`; where it does not (high ratios: 91.8% of 14 x 14 at 0.2 leaves 65% of the patches
    under 1%), the smallest larger sigma that does, i.e. the most centred masking that still
    trains every position. Bisection on a log scale, rounded up to two digits."""
    if coverage(grid_size, ratio, sigma, floor)[1] >= floor:
        return sigma
    lo, hi = sigma, sigma
    while coverage(grid_size, ratio, hi, floor)[1] < floor:  # a flat enough Gaussian always does
        lo, hi = hi, hi * 2
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if coverage(grid_size, ratio, mid, floor)[1] >= floor else (mid, hi)
    step = 10.0 ** (math.floor(math.log10(hi)) - 1)  # up to two significant digits
    return round(math.ceil(hi / step) * step, 10)


# ----------------------------------------------------------------------------- text masking

# FLIP (Table 1c) shortens the text too: `random` keeps a random subset of the T token positions,
# `prioritized` drops the padding first and then random caption tokens (67.8 vs 66.0 top-1 at length
# 16, full length 32: 68.2). `truncate` keeps the first L positions: CLIP's own behaviour at T, and
# CLIPA's (arXiv 2305.07017) best choice.
TEXT_MODES = ("truncate", "random", "prioritized")


def check_text_args(context_length, length, mode):
    if mode not in TEXT_MODES:
        raise ValueError(f"unknown text masking mode {mode!r}; expected one of {TEXT_MODES}")
    if not 2 <= length <= context_length:
        raise ValueError(f"text length must be in [2, {context_length}] (start and end-of-text "
                         f"tokens), got {length}")


def text_keep_indices(tokens, length, mode, generator=None):
    """(B, L) LongTensor: the positions of the (B, T) token ids each caption keeps, sorted
    ascending.

    The start token (position 0) and the end-of-text token always survive; the end-of-text token is
    the largest id in the row (CLIP's convention, where the text tower pools), so no vocabulary is
    needed. Built on the tokens' device with no host-device synchronisation, vectorised. Encode
    `tokens.gather(1, keep)` with positional embeddings `keep`. L == T keeps every position, in
    order.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T) token ids, got shape {tuple(tokens.shape)}")
    check_text_args(tokens.shape[1], length, mode)
    B, T = tokens.shape
    position = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
    eot = tokens.argmax(dim=-1, keepdim=True)  # (B, 1) end-of-text position
    if mode == "truncate":
        # (B, T) earlier tokens first: 0..L-2 and eot when the caption is longer than L
        scores = -position.float()
    else:
        scores = torch.rand(B, T, device=tokens.device, generator=generator)  # (B, T) u ~ U(0, 1)
        if mode == "prioritized":
            # caption tokens (score >= 1) outrank the padding after eot (< 1)
            scores = scores + (position <= eot)
    # start and end-of-text always kept
    scores = scores.masked_fill((position == 0) | (position == eot), math.inf)
    keep = scores.topk(length, dim=1, sorted=False).indices  # (B, L) the L highest scores survive
    # in order, so causal attention reads the kept tokens as the caption reads
    return keep.sort(dim=1).values


if __name__ == "__main__":
    torch.set_printoptions(precision=2, linewidth=160)
    for mode, sigma in [("random", 0.2), ("gaussian", 0.1), ("gaussian", 0.2), ("gaussian", 0.8)]:
        print(f"keep probability, {mode}, ratio 0.5, sigma {sigma}, 14 x 14 patches:")
        print(keep_probability(14, 0.5, mode, sigma))
    # "a photo of a dog in the snow." in CLIP's BPE ids, T = 16: start, 9 caption tokens,
    # end-of-text at 10, padding
    caption = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 530, 518, 2583, 269, 49407,
                             0, 0, 0, 0, 0]])
    print("positions kept of a 16-token caption (end-of-text at 10), length 8:")
    for mode in TEXT_MODES:
        kept = text_keep_indices(caption, 8, mode, torch.Generator().manual_seed(0))[0]
        print(f"  {mode:11s}", kept.tolist())
