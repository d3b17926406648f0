"""The contract of model.py: shapes, masking inside the image tower, the loss, and OpenCLIP interop."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import masking
import model as M


def tiny(**overrides):
    torch.manual_seed(0)
    return M.create_model("tiny", **overrides).eval()


def batch(model, n, seed=0):
    """(n, 3, S, S) images and (n, T) token ids for `model`: bench.synthetic_batch, end-of-text at varied positions."""
    return bench.synthetic_batch(model.config, n, torch.device("cpu"), torch.Generator().manual_seed(seed))


def test_vit_b16_has_openclip_shapes():
    model = M.create_model("ViT-B-16")
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # OpenCLIP's ViT-B-16: 149.62M
    assert model.visual.grid_size == 14 and model.visual.positional_embedding.shape == (197, 768)
    assert model.text.positional_embedding.shape == (77, 512) and model.text.proj.shape == (512, 512)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


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
        assert torch.allclose(model.encode_image(images, all_patches), model.encode_image(images), atol=1e-6)


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
    positions = masking.text_keep_indices(tokens, 12, "random", generator=torch.Generator().manual_seed(0))
    kept = tokens.gather(1, positions)  # (4, 12)
    with torch.no_grad():
        masked = model.encode_text(kept, positions)
        for i in range(4):  # the same sample through a text tower whose first 12 position rows are its kept ones
            by_hand = copy.deepcopy(model.text)
            by_hand.positional_embedding.data = model.text.positional_embedding[positions[i].tolist()]
            assert torch.allclose(by_hand(kept[i:i + 1])[0], masked[i], atol=1e-6)
        assert not torch.allclose(model.encode_text(kept), masked, atol=1e-3)  # rows 0..11 instead: other features
        _, text_features, _ = model(torch.zeros(4, 3, 64, 64), kept, None, positions)
        assert torch.allclose(text_features, F.normalize(masked, dim=-1), atol=1e-6)


@pytest.mark.parametrize("mode", masking.TEXT_MODES)
def test_text_at_full_length_is_the_unmasked_text(mode):
    model = tiny()
    _, tokens = batch(model, 4)
    positions = masking.text_keep_indices(tokens, model.config.context_length, mode)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens.gather(1, positions), positions), model.encode_text(tokens))


def test_forward_returns_normalised_features():
    model = tiny()
    images, tokens = batch(model, 3)
    img, txt, scale = model(images, tokens)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_clip_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 10.0 * img @ txt.T
    by_hand = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    assert M.clip_loss(img, txt, torch.tensor(10.0)).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert M.clip_loss(img, img, torch.tensor(100.0)) < 0.01  # perfectly matched pairs: near zero
    assert M.clip_loss(img, txt, torch.tensor(10.0)).item() == pytest.approx(M.clip_loss(txt, img, torch.tensor(10.0)).item())


def test_tiny_preset_under_torch_compile():
    model = tiny()
    images, tokens = batch(model, 4)
    keep = masking.keep_indices(4, model.visual.grid_size, 0.5, "gaussian")
    positions = masking.text_keep_indices(tokens, 16, "prioritized")
    compiled = torch.compile(model)
    with torch.no_grad():
        for args in [(tokens,), (tokens.gather(1, positions), keep, positions)]:  # unmasked; patches and text masked
            eager = model(images, *args)
            out = compiled(images, *args)
            for a, b in zip(out, eager):
                assert torch.allclose(a, b, atol=1e-5)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("ViT-X-99")


def openclip_vit_b16_state_dict(prefix=""):
    """A state dict with the key names and shapes OpenCLIP's ViT-B-16 publishes (values: distinct random numbers)."""
    shapes = {"logit_scale": (), "visual.class_embedding": (768,), "visual.positional_embedding": (197, 768),
              "visual.proj": (768, 512), "visual.conv1.weight": (768, 3, 16, 16), "token_embedding.weight": (49408, 512),
              "positional_embedding": (77, 512), "text_projection": (512, 512)}
    for ln in ["visual.ln_pre", "visual.ln_post", "ln_final"]:
        width = 512 if ln == "ln_final" else 768
        shapes |= {f"{ln}.weight": (width,), f"{ln}.bias": (width,)}
    for tower, width in [("visual.transformer", 768), ("transformer", 512)]:
        for i in range(12):
            b = f"{tower}.resblocks.{i}"
            shapes |= {f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                       f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,),
                       f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
                       f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
                       f"{b}.mlp.c_fc.weight": (4 * width, width), f"{b}.mlp.c_fc.bias": (4 * width,),
                       f"{b}.mlp.c_proj.weight": (width, 4 * width), f"{b}.mlp.c_proj.bias": (width,)}
    g = torch.Generator().manual_seed(0)
    return {prefix + k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_openclip_state_dict_maps_every_key(prefix):
    openclip = openclip_vit_b16_state_dict(prefix)
    openclip[prefix + "attn_mask"] = torch.empty(77, 77)  # a buffer some exports carry; we use is_causal instead
    openclip[prefix + "context_length"] = torch.tensor(77)  # OpenAI archives carry config entries too
    converted = M.convert_openclip_state_dict(openclip)
    model = M.create_model("ViT-B-16")
    model.load_state_dict(converted, strict=True)  # every key present, none left over, shapes equal
    params = dict(model.named_parameters())
    assert torch.equal(params["text.proj"], openclip[prefix + "text_projection"])
    assert torch.equal(params["visual.blocks.11.attn.in_proj.weight"],
                       openclip[prefix + "visual.transformer.resblocks.11.attn.in_proj_weight"])
    assert torch.equal(params["text.blocks.0.mlp.c_fc.bias"], openclip[prefix + "transformer.resblocks.0.mlp.c_fc.bias"])
    assert torch.equal(params["text.token_embedding.weight"], openclip[prefix + "token_embedding.weight"])


def openclip_init(name, cfg):
    """OpenCLIP's init of one tensor of a fresh CLIP: ("normal", std), ("uniform", bound) or ("constant", value).

    Image tower: PyTorch's defaults (nn.Linear / nn.Conv2d weights and biases uniform(+-1/sqrt(fan_in)),
    nn.MultiheadAttention's xavier-uniform in_proj and zero biases), embeddings and projection scale * randn.
    Text tower: CLIP's normal init of the weights; biases as the image tower's.
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
                "attn.in_proj.weight": ("uniform", (6 / (width + 3 * width)) ** 0.5),  # xavier: fan_in + fan_out
                "attn.out_proj.weight": ("uniform", width ** -0.5),
                "mlp.c_fc.weight": ("uniform", width ** -0.5), "mlp.c_fc.bias": ("uniform", width ** -0.5),
                "mlp.c_proj.weight": ("uniform", hidden ** -0.5), "mlp.c_proj.bias": ("uniform", hidden ** -0.5)}[kind]
    return {"text.token_embedding.weight": ("normal", 0.02), "text.positional_embedding": ("normal", 0.01),
            "text.proj": ("normal", width ** -0.5),
            "attn.in_proj.weight": ("normal", width ** -0.5), "attn.out_proj.weight": ("normal", proj_std),
            "mlp.c_fc.weight": ("normal", (2 * width) ** -0.5), "mlp.c_proj.weight": ("normal", proj_std),
            "mlp.c_fc.bias": ("uniform", width ** -0.5), "mlp.c_proj.bias": ("uniform", hidden ** -0.5)}[kind]


@pytest.mark.parametrize("name", ["ViT-B-16", "tiny"])
def test_init_is_openclips_tensor_by_tensor(name):
    torch.manual_seed(0)
    model = M.create_model(name)
    for key, x in model.state_dict().items():
        rule, value = openclip_init(key, model.config)
        if rule == "constant":
            assert torch.all(x == value), key
            continue
        std = value if rule == "normal" else value / math.sqrt(3)  # uniform(-b, b) has std b / sqrt(3)
        n = x.numel()
        # sampling noise: the mean has std/sqrt(n) of it, the std relatively at most 1/sqrt(2n) (normal's)
        assert abs(x.mean().item()) < 5 * std / math.sqrt(n), key
        assert abs(x.std().item() / std - 1) < 5 / math.sqrt(2 * n), (key, x.std().item(), std)
        if rule == "uniform":
            assert x.abs().max().item() <= value, key


def test_grid_size_follows_image_size():
    model = M.create_model("tiny", image_size=48)
    assert model.config.grid_size == model.visual.grid_size == 6  # 48 px in 8 px patches
    assert model.visual.positional_embedding.shape == (1 + 6 * 6, 128)


def test_resize_pos_embed_same_grid_is_identity():
    pe = torch.randn(1 + 14 * 14, 16)
    assert torch.equal(M.resize_pos_embed(pe, 14), pe)


@pytest.mark.parametrize("old, new", [(10, 14), (14, 10), (2, 7)])
def test_resize_pos_embed_shapes_and_class_row(old, new):
    pe = torch.randn(1 + old * old, 16)
    out = M.resize_pos_embed(pe, new)
    assert out.shape == (1 + new * new, 16)
    assert torch.equal(out[0], pe[0])  # the class token has no place on the grid


def test_resize_pos_embed_known_values():
    # a 2x2 grid whose value is its column index (0, 1), the same in every channel; resized to 4x4, each row is the
    # 1-D resampling of [0, 1] by the antialiased bicubic kernel (Keys, a = -0.5), with taps falling outside the grid
    # dropped and the rest renormalised. Output column i sits at input coordinate (i + 0.5) / 2 - 0.5; its taps are
    # the two input columns, with k(0.25) = 111/128, k(1.25) = -9/128, k(0.75) = 29/128, giving:
    expected_row = torch.tensor([-9 / 102, 29 / 140, 111 / 140, 1 + 9 / 102])
    grid = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(4, 1).expand(4, 3)  # (G0*G0, D), row-major
    pe = torch.cat([torch.full((1, 3), 5.0), grid])
    out = M.resize_pos_embed(pe, 4)[1:].reshape(4, 4, 3)
    assert torch.allclose(out, expected_row.view(1, 4, 1).expand(4, 4, 3), atol=1e-6)
    constant = torch.full((1 + 5 * 5, 3), 0.25)
    assert torch.allclose(M.resize_pos_embed(constant, 9), torch.full((1 + 9 * 9, 3), 0.25), atol=1e-6)


def test_resize_pos_embed_rejects_a_non_square_grid():
    with pytest.raises(ValueError, match="1 \\+ G\\*G"):
        M.resize_pos_embed(torch.randn(1 + 12, 8), 4)


def test_fit_state_dict_to_loads_a_lower_resolution_checkpoint():
    low, high = tiny(image_size=48), tiny()  # RECLIP: trained on a 6x6 grid, evaluated on 8x8
    state_dict = low.state_dict()
    fitted = M.fit_state_dict_to(high, state_dict)
    high.load_state_dict(fitted, strict=True)
    assert torch.equal(high.visual.positional_embedding,
                       M.resize_pos_embed(state_dict["visual.positional_embedding"], 8))
    assert torch.equal(high.text.proj, state_dict["text.proj"])
    same = M.fit_state_dict_to(low, state_dict)  # same grid: nothing resized
    assert same["visual.positional_embedding"] is state_dict["visual.positional_embedding"]


def test_flops_count_masked_tokens():
    cfg = M.PRESETS["ViT-B-16"]
    full, half = M.flops_per_sample(cfg), M.flops_per_sample(cfg, masking.num_kept(14, 0.5))
    assert 40e9 < full < 42e9  # ~41 GFLOPs per image-text pair, forward
    assert 1.7 < full / half < 1.8  # the text tower is not masked, so less than 2x


def text_flops_counted(model, tokens, length):
    """Forward FLOPs per caption of encode_text on `length` kept tokens, as torch's FLOP counter sees the matmuls
    (attention through the math kernel, whose two matmuls it counts in full, as transformer_flops does)."""
    positions = masking.text_keep_indices(tokens, length, "random")
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.encode_text(tokens.gather(1, positions), positions)
    return counter.get_total_flops() / len(tokens)


def test_flops_follow_the_text_tokens_encoded():
    model = tiny()
    cfg, (_, tokens) = model.config, batch(model, 2)
    kept = masking.num_kept(cfg.grid_size, 0.75)
    assert M.flops_per_sample(cfg, kept, cfg.context_length) == M.flops_per_sample(cfg, kept)  # default: all of them
    full = text_flops_counted(model, tokens, cfg.context_length)
    for length in (16, 8):
        counted_saving = full - text_flops_counted(model, tokens, length)
        assert M.flops_per_sample(cfg, kept) - M.flops_per_sample(cfg, kept, length) == counted_saving
    vit_b16 = M.PRESETS["ViT-B-16"]
    speedup = lambda ratio, length: M.flops_per_sample(vit_b16) / M.flops_per_sample(  # noqa: E731
        vit_b16, masking.num_kept(14, ratio), length)
    assert 4.2 < speedup(0.9, 77) < 4.4 and 8.3 < speedup(0.9, 16) < 8.6  # the text tower caps the speedup at 90%


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 3060", None),  # unknown: MFU is not reported rather than made up
])
def test_peak_flops_by_device_name(name, peak):
    assert M.peak_flops_by_name(name) == peak


def test_no_peak_on_the_cpu():
    assert M.peak_flops("cpu") is None
