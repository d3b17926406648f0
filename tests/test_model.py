"""The contract of model.py: shapes, masking inside the image tower, the loss, and OpenCLIP
interop."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import distributed as D
import masking
import model as M
from conftest import synthetic_batch
from tokenizer import trim_padding


def tiny(**overrides):
    torch.manual_seed(0)
    return M.create_model("tiny", **overrides).eval()


def batch(model, n, seed=0):
    """(n, 3, S, S) images and (n, T) token ids for `model`: conftest.synthetic_batch, end-of-text
    at varied positions."""
    return synthetic_batch(model.config, n, torch.Generator().manual_seed(seed))


def test_vit_b16_has_openclip_shapes():
    model = M.create_model("ViT-B-16")
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # OpenCLIP's ViT-B-16: 149.62M
    assert model.visual.grid_size == 14 and model.visual.positional_embedding.shape == (197, 768)
    assert (model.text.positional_embedding.shape == (77, 512)
            and model.text.proj.shape == (512, 512))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


@pytest.mark.parametrize("name, params, vision_params, positions, heads, text, mlp", [
    # counted in open_clip_torch 3.3.0's create_model(name) (2026-12-01): the whole model, its
    # image tower; ViT-H-14 has 14 px patches (a 16 x 16 grid at 224 px) and 80-wide image heads.
    # ViT-g-14 and ViT-bigG-14: counted in open_clip_torch 3.3.0's CLIP(**get_model_config(name))
    # on the meta device (2026-12-08), the published 1.37B and 2.54B; image heads 88 and 104 wide,
    # image MLPs int(width * mlp_ratio) = int(1408 * 4.3637) and int(1664 * 4.9231)
    ("ViT-L-16", 427_739_393, 304_089_088, (197, 1024), 16, (768, 12, 12), (4096, 3072)),
    ("ViT-H-14", 986_109_441, 632_076_800, (257, 1280), 16, (1024, 16, 24), (5120, 4096)),
    ("ViT-g-14", 1_366_678_273, 1_012_645_632, (257, 1408), 16, (1024, 16, 24), (6144, 4096)),
    ("ViT-bigG-14", 2_539_567_105, 1_844_907_264, (257, 1664), 16, (1280, 20, 32), (8192, 5120)),
])
def test_large_presets_have_openclip_shapes(name, params, vision_params, positions, heads, text,
                                            mlp):
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = M.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.visual.parameters()) == vision_params
    assert model.visual.positional_embedding.shape == positions
    assert model.visual.blocks[0].attn.heads == heads
    width, text_heads, layers = text
    assert (model.text.blocks[0].attn.heads, len(model.text.blocks)) == (text_heads, layers)
    assert model.text.proj.shape == (width, model.config.embed_dim)
    hidden = [tower.blocks[0].mlp.c_fc.out_features for tower in (model.visual, model.text)]
    assert tuple(hidden) == mlp


def test_vit_b16_masked_forward_and_backward_on_cpu():
    model = M.create_model("ViT-B-16")
    images, tokens = batch(model, 2)
    keep = masking.keep_indices(2, 14, 0.5, "gaussian")
    image_features, text_features, scale = model(images, tokens, keep)
    assert image_features.shape == text_features.shape == (2, 512)
    M.clip_loss(image_features, text_features, scale).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dropped_patches_do_not_matter_and_kept_ones_do():
    model, g = tiny(), torch.Generator().manual_seed(0)
    grid, patch = model.visual.grid_size, model.config.patch_size
    images = torch.randn(1, 3, 64, 64, generator=g)
    keep = masking.keep_indices(1, grid, 0.5, "random", generator=g)
    dropped = sorted(set(range(grid * grid)) - set(keep[0].tolist()))

    def perturb(index):  # add noise to one patch, numbered row-major
        out = images.clone()
        r, c = divmod(index, grid)
        out[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 1.0
        return out

    with torch.no_grad():
        base = model.encode_image(images, keep)
        assert torch.equal(model.encode_image(perturb(dropped[0]), keep), base)
        assert not torch.allclose(model.encode_image(perturb(keep[0, 0].item()), keep), base)
        # keeping every patch is the same as not masking at all
        all_patches = torch.arange(grid * grid).unsqueeze(0)
        assert torch.allclose(model.encode_image(images, all_patches), model.encode_image(images),
                              atol=1e-6)


def test_kept_patches_carry_their_own_positions():
    # two kept patches swap their pixels: with positions added before the gather, the image tower
    # sees where each patch came from, so the features change; without them (or with the positions
    # of the kept slots instead of the patches') a swap inside the kept set would go unnoticed
    model, g = tiny(), torch.Generator().manual_seed(0)
    grid, patch = model.visual.grid_size, model.config.patch_size
    images = torch.randn(1, 3, 64, 64, generator=g)
    keep = masking.keep_indices(1, grid, 0.5, "random", generator=g)  # (1, 32)
    (r1, c1), (r2, c2) = divmod(keep[0, 0].item(), grid), divmod(keep[0, -1].item(), grid)
    a = (..., slice(r1 * patch, (r1 + 1) * patch), slice(c1 * patch, (c1 + 1) * patch))
    b = (..., slice(r2 * patch, (r2 + 1) * patch), slice(c2 * patch, (c2 + 1) * patch))
    swapped = images.clone()
    swapped[a], swapped[b] = images[b], images[a]
    with torch.no_grad():
        base, moved = model.encode_image(images, keep), model.encode_image(swapped, keep)
        # the same patch set in another order of tokens is the same image: attention has no order
        reordered = model.encode_image(images, keep.flip(1))
    assert not torch.allclose(moved, base, atol=1e-4)
    assert torch.allclose(reordered, base, atol=1e-5)


def test_text_is_causal_and_pooled_at_end_of_text():
    model = tiny()
    _, tokens = batch(model, 4)
    with torch.no_grad():
        base = model.encode_text(tokens)
        after = tokens.clone()
        eot = tokens.argmax(-1)
        for i, e in enumerate(eot.tolist()):  # change what comes after the end-of-text token
            after[i, e + 1:] = 7
        assert torch.allclose(model.encode_text(after), base, atol=1e-6)
        before = tokens.clone()
        before[:, 0] = 5  # change the first token: the pooled (last) position sees it
        assert not torch.allclose(model.encode_text(before), base)


def test_kept_text_tokens_carry_their_own_positions():
    model = tiny()
    _, tokens = batch(model, 4)
    g = torch.Generator().manual_seed(0)
    positions = masking.text_keep_indices(tokens, 12, "random", generator=g)
    kept = tokens.gather(1, positions)  # (4, 12)
    with torch.no_grad():
        masked = model.encode_text(kept, positions)
        # the same sample through a text tower whose first 12 position rows are its kept ones
        for i in range(4):
            by_hand = copy.deepcopy(model.text)
            kept_rows = model.text.positional_embedding[positions[i].tolist()]
            by_hand.positional_embedding.data = kept_rows
            assert torch.allclose(by_hand(kept[i:i + 1])[0], masked[i], atol=1e-6)
        # rows 0..11 instead: other features
        assert not torch.allclose(model.encode_text(kept), masked, atol=1e-3)
        _, text_features, _ = model(torch.zeros(4, 3, 64, 64), kept, None, positions)
        assert torch.allclose(text_features, F.normalize(masked, dim=-1), atol=1e-6)


@pytest.mark.parametrize("mode", masking.TEXT_MODES)
def test_text_at_full_length_is_the_unmasked_text(mode):
    model = tiny()
    _, tokens = batch(model, 4)
    positions = masking.text_keep_indices(tokens, model.config.context_length, mode)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens.gather(1, positions), positions),
                           model.encode_text(tokens))


def test_forward_returns_normalised_features():
    model = tiny()
    images, tokens = batch(model, 3)
    img, txt, scale = model(images, tokens)
    assert (torch.allclose(img.norm(dim=-1), torch.ones(3))
            and torch.allclose(txt.norm(dim=-1), torch.ones(3)))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_clip_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 10.0 * img @ txt.T
    by_hand = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    assert (M.clip_loss(img, txt, torch.tensor(10.0)).item()
            == pytest.approx(by_hand.item(), rel=1e-6))
    assert M.clip_loss(img, img, torch.tensor(100.0)) < 0.01  # perfectly matched pairs: near zero
    assert (M.clip_loss(img, txt, torch.tensor(10.0)).item()
            == pytest.approx(M.clip_loss(txt, img, torch.tensor(10.0)).item()))


def test_blocks_compiled_in_place_give_the_eager_features_and_keep_their_names():
    model, reference = tiny(), tiny()
    D.compile_blocks(model)  # regional: each Transformer block, in place
    assert list(model.state_dict()) == list(reference.state_dict())  # no `_orig_mod.` prefixes
    images, tokens = batch(model, 4)
    keep = masking.keep_indices(4, model.visual.grid_size, 0.5, "gaussian")
    positions = masking.text_keep_indices(tokens, 16, "prioritized")
    with torch.no_grad():
        # unmasked; patches and text masked
        for args in [(tokens,), (tokens.gather(1, positions), keep, positions)]:
            for a, b in zip(model(images, *args), reference(images, *args)):
                assert torch.allclose(a, b, atol=1e-5)
        with torch.compiler.set_stance("force_eager"):  # as train.py evaluates: no recompiles
            eager = model.encode_image(images[:3])
            assert torch.allclose(eager, reference.encode_image(images[:3]), atol=1e-5)


def loss_grads_and_saved_bytes(model, images, tokens, keep, positions):
    """(loss, flat gradient, bytes of activations autograd saves for backward) of one training
    forward and backward; each storage counted once, the parameters' not at all. A checkpointed
    block's tensors go to the checkpoint's own hooks (innermost wins), so they are not counted."""
    params, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = M.clip_loss(*model(images, tokens, keep, positions))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss.detach(), grads, sum(n for ptr, n in saved.items() if ptr not in params)


def test_trimmed_padding_gives_the_same_loss_and_gradients():
    # captions of 3..8 tokens in 32 positions: train.py encodes only the first 9
    model = tiny().train()
    images, tokens = batch(model, 4)
    T, V = model.config.context_length, model.config.vocab_size
    lengths = torch.tensor([3, 8, 5, 2])  # end-of-text positions
    tokens = torch.where(torch.arange(T) < lengths[:, None], tokens.clamp(max=V - 2), 0)
    tokens = tokens.scatter(1, lengths[:, None], V - 1)
    trimmed = trim_padding(tokens)
    assert trimmed.shape == (4, 9) and torch.equal(trimmed, tokens[:, :9])
    assert torch.equal(trimmed.argmax(-1), lengths)  # every end-of-text token kept
    keep = masking.keep_indices(4, 8, 0.5, "gaussian", generator=torch.Generator().manual_seed(0))
    loss, grads, _ = loss_grads_and_saved_bytes(model, images, tokens, keep, None)
    model.zero_grad()
    loss_t, grads_t, _ = loss_grads_and_saved_bytes(model, images, trimmed, keep, None)
    torch.testing.assert_close(loss_t, loss, rtol=0, atol=1e-6)
    # the same sums in other matmul shapes round differently: ~2e-6 of gradients ~0.2
    torch.testing.assert_close(grads_t, grads, rtol=0, atol=1e-5)
    full = torch.cat([tokens[:, :T - 1].clamp(max=V - 2), torch.full((4, 1), V - 1)], 1)
    # captions that fill every position: nothing to trim
    assert trim_padding(full) is full


@pytest.mark.parametrize("compiled", [False, True])
def test_grad_checkpointing_keeps_loss_and_gradients_and_saves_less(compiled):
    images, tokens = batch(tiny(), 4)
    keep = masking.keep_indices(4, 8, 0.5, "gaussian", generator=torch.Generator().manual_seed(0))
    positions = masking.text_keep_indices(tokens, 16, "prioritized")
    tokens = tokens.gather(1, positions)
    plain, checkpointed = tiny().train(), tiny().train()
    checkpointed.set_grad_checkpointing(True)
    if compiled:  # the blocks compiled in place, as train.py --compile: checkpointed all the same
        D.compile_blocks(checkpointed)
    loss, grads, saved = loss_grads_and_saved_bytes(plain, images, tokens, keep, positions)
    loss_c, grads_c, saved_c = loss_grads_and_saved_bytes(checkpointed, images, tokens, keep,
                                                          positions)
    tolerance = 1e-5 if compiled else 1e-6  # compiled kernels round differently; eager recomputes
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=tolerance)
    torch.testing.assert_close(grads_c, grads, rtol=0, atol=tolerance)
    # the 8 blocks' activations are recomputed in backward, not saved: what is left is the patch
    # embedding, ln_pre, ln_post, the projections and the loss
    assert saved_c < saved / 4, (saved_c, saved)
    with torch.no_grad():  # no gradients, nothing to recompute: the same features either way
        for a, b in zip(checkpointed(images, tokens, keep, positions),
                        plain(images, tokens, keep, positions)):
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance)


def test_the_image_towers_residual_stream_is_in_the_activation_dtype():
    # under bf16 autocast the patch embedding is bf16; the positions and the class token are cast to
    # it, as OpenCLIP does, so the blocks carry bf16, not an fp32 stream promoted by a parameter
    model, seen = tiny(), []
    model.visual.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    images, tokens = batch(model, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_image(images, masking.keep_indices(2, 8, 0.5, "random"))
    assert seen == [torch.bfloat16]


def test_attention_on_the_cpu_under_bf16_runs_in_fp32_and_returns_bf16(monkeypatch):
    # the CPU's bf16 attention backward is several times slower than its fp32 one: fp32 there,
    # the block's output still bf16; the gradient reaches the inputs
    sdpa, seen = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    attention = M.Attention(16, 2)
    x = torch.randn(3, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(x, causal=True)
    assert seen == [torch.float32] and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    attention(x)  # fp32 without autocast, as before
    assert seen == [torch.float32, torch.float32]


def test_layer_norm_returns_its_inputs_dtype(monkeypatch):
    # CUDA autocast runs layer_norm in fp32 (the CPU's keeps bf16): stand in for it here
    layer_norm = F.layer_norm
    monkeypatch.setattr(F, "layer_norm", lambda *a, **k: layer_norm(*a, **k).float())
    x = torch.randn(2, 8).bfloat16()
    assert M.LayerNorm(8).bfloat16()(x).dtype == torch.bfloat16
    assert torch.nn.LayerNorm(8).bfloat16()(x).dtype == torch.float32  # what it would be without


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("ViT-X-99")


def openclip_init(name, cfg):
    """OpenCLIP's init of one tensor of a fresh CLIP: ("normal", std), ("uniform", bound) or
    ("constant", value).

    Image tower: PyTorch's defaults (nn.Linear / nn.Conv2d weights and biases
    uniform(+-1/sqrt(fan_in)), nn.MultiheadAttention's xavier-uniform in_proj and zero biases),
    embeddings and projection scale * randn. Text tower: CLIP's normal init of the weights; biases
    as the image tower's.
    """
    vision = name.startswith("visual.")
    width = cfg.vision_width if vision else cfg.text_width
    layers = cfg.vision_layers if vision else cfg.text_layers
    hidden = int(width * cfg.mlp_ratio)
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    if name == "logit_scale":
        return "constant", math.log(1 / 0.07)
    if ".ln_" in name:
        return "constant", 1.0 if name.endswith("weight") else 0.0
    if name.endswith(("attn.in_proj.bias", "attn.out_proj.bias")):
        return "constant", 0.0
    kind = name.split("blocks.")[-1].split(".", 1)[-1] if ".blocks." in name else name
    if vision:
        return {"visual.class_embedding": ("normal", width ** -0.5),
                "visual.positional_embedding": ("normal", width ** -0.5),
                "visual.proj": ("normal", width ** -0.5),
                "visual.conv1.weight": ("uniform", (3 * cfg.patch_size ** 2) ** -0.5),
                # xavier: fan_in + fan_out
                "attn.in_proj.weight": ("uniform", (6 / (width + 3 * width)) ** 0.5),
                "attn.out_proj.weight": ("uniform", width ** -0.5),
                "mlp.c_fc.weight": ("uniform", width ** -0.5),
                "mlp.c_fc.bias": ("uniform", width ** -0.5),
                "mlp.c_proj.weight": ("uniform", hidden ** -0.5),
                "mlp.c_proj.bias": ("uniform", hidden ** -0.5)}[kind]
    return {"text.token_embedding.weight": ("normal", 0.02),
            "text.positional_embedding": ("normal", 0.01),
            "text.proj": ("normal", width ** -0.5),
            "attn.in_proj.weight": ("normal", width ** -0.5),
            "attn.out_proj.weight": ("normal", proj_std),
            "mlp.c_fc.weight": ("normal", (2 * width) ** -0.5),
            "mlp.c_proj.weight": ("normal", proj_std),
            "mlp.c_fc.bias": ("uniform", width ** -0.5),
            "mlp.c_proj.bias": ("uniform", hidden ** -0.5)}[kind]


@pytest.mark.parametrize("name", ["ViT-B-16", "tiny"])
def test_init_is_openclips_tensor_by_tensor(name):
    torch.manual_seed(0)
    model = M.create_model(name)
    for key, x in model.state_dict().items():
        rule, value = openclip_init(key, model.config)
        if rule == "constant":
            assert torch.all(x == value), key
            continue
        # uniform(-b, b) has std b / sqrt(3)
        std = value if rule == "normal" else value / math.sqrt(3)
        n = x.numel()
        # sampling noise: the mean has std/sqrt(n) of it, the std relatively at most 1/sqrt(2n)
        # (normal's)
        assert abs(x.mean().item()) < 5 * std / math.sqrt(n), key
        assert abs(x.std().item() / std - 1) < 5 / math.sqrt(2 * n), (key, x.std().item(), std)
        if rule == "uniform":
            assert x.abs().max().item() <= value, key


def test_grid_size_follows_image_size():
    model = M.create_model("tiny", image_size=48)
    assert model.config.grid_size == model.visual.grid_size == 6  # 48 px in 8 px patches
    assert model.visual.positional_embedding.shape == (1 + 6 * 6, 128)


def test_weight_decay_follows_openclips_rule_by_name():
    model = M.create_model("tiny")
    decay, no_decay = M.param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    # OpenCLIP decays both positional embeddings, the token embedding and the projections ...
    assert {"visual.positional_embedding", "text.positional_embedding",
            "text.token_embedding.weight", "visual.proj", "text.proj", "visual.conv1.weight",
            "visual.blocks.0.attn.in_proj.weight", "text.blocks.3.mlp.c_proj.weight"} <= decayed
    # ... and not the 1-D class embedding, LayerNorms, biases or the logit scale
    assert {"logit_scale", "visual.class_embedding", "visual.ln_pre.weight", "visual.ln_post.bias",
            "text.ln_final.weight", "visual.blocks.0.ln_1.weight",
            "visual.blocks.0.attn.in_proj.bias", "text.blocks.0.mlp.c_fc.bias"} <= skipped
    # every tensor in exactly one group; tiny has 4 + 4 blocks of 4 weight matrices, and per tower
    # 3 more decayed tensors (image: conv1, positions, proj; text: token embedding, positions, proj)
    assert decayed | skipped == set(names.values()) and not decayed & skipped
    assert len(decayed) == 2 * (4 * 4 + 3) == 38
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


def test_flops_count_masked_tokens():
    cfg = M.PRESETS["ViT-B-16"]
    full, half = M.flops_per_sample(cfg), M.flops_per_sample(cfg, masking.num_kept(14, 0.5))
    assert 40e9 < full < 42e9  # ~41 GFLOPs per image-text pair, forward
    assert 1.7 < full / half < 1.8  # the text tower is not masked, so less than 2x


def text_flops_counted(model, tokens, length):
    """Forward FLOPs per caption of encode_text on `length` kept tokens, as torch's FLOP counter
    sees the matmuls (attention through the math kernel, whose two matmuls it counts in full, as
    transformer_flops does)."""
    positions = masking.text_keep_indices(tokens, length, "random")
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.encode_text(tokens.gather(1, positions), positions)
    return counter.get_total_flops() / len(tokens)


def test_flops_follow_the_text_tokens_encoded():
    model = tiny()
    cfg, (_, tokens) = model.config, batch(model, 2)
    kept = masking.num_kept(cfg.grid_size, 0.75)
    # default: all of them
    assert M.flops_per_sample(cfg, kept, cfg.context_length) == M.flops_per_sample(cfg, kept)
    full = text_flops_counted(model, tokens, cfg.context_length)
    for length in (16, 8):
        counted_saving = full - text_flops_counted(model, tokens, length)
        modelled_saving = M.flops_per_sample(cfg, kept) - M.flops_per_sample(cfg, kept, length)
        assert modelled_saving == counted_saving
    vit_b16 = M.PRESETS["ViT-B-16"]
    speedup = lambda ratio, length: M.flops_per_sample(vit_b16) / M.flops_per_sample(  # noqa: E731
        vit_b16, masking.num_kept(14, ratio), length)
    # the text tower caps the speedup at 90%
    assert 4.2 < speedup(0.9, 77) < 4.4 and 8.3 < speedup(0.9, 16) < 8.6


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),  # the PCIe card: lower power and clocks than the SXM H200
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 3060", None),  # unknown: MFU is not reported rather than made up
])
def test_peak_flops_by_device_name(name, peak):
    assert D.peak_flops_by_name(name) == peak


def test_no_peak_on_the_cpu():
    assert D.peak_flops("cpu") is None
